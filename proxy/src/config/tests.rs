//! One named test per bad input an operator can write, each asserting the
//! message they would read.

use super::*;

const ROUTES: &str = r#"[server]
listen = ["127.0.0.1:8080"]
admin = "127.0.0.1:9901"

[clusters.kred]
connect_timeout = "500ms"

[[clusters.kred.sites]]
name = "skondal"
role = "primary"
backends = ["127.0.0.1:9001", "127.0.0.1:9002"]

[[clusters.kred.sites]]
name = "verizon"
role = "secondary"
backends = ["127.0.0.1:9101"]

[[routes]]
name = "checkout"
match = { path_prefix = "/checkout/" }
tier = "purchase"
cluster = "kred"
timeout = "10s"

[[routes]]
name = "admin"
match = { path_prefix = "/admin/", methods = ["GET", "POST"] }
tier = "admin"
cluster = "kred"
"#;

const POLICY: &str = r#"tiers = ["purchase", "merchant", "admin"]

[tier.admin]
max_queue_wait = "100ms"
max_share = 0.3

[shedding]
never_shed = ["purchase"]
retry_after = "1500ms"

[trust]
tier_header_from = ["10.0.0.0/8", "127.0.0.1"]
"#;

fn src(path: &str, text: &str) -> SourceFile {
    SourceFile {
        path: path.into(),
        text: text.to_string(),
    }
}

fn load(routes: &str, policy: &str) -> Result<Config, ConfigErrors> {
    load_sources(&src("routes.toml", routes), &src("policy.toml", policy))
}

/// The one error a broken file gives, as `file:line:col: error: message`.
fn only_error(routes: &str, policy: &str) -> ConfigError {
    let errs = load(routes, policy).expect_err("the file is invalid").0;
    assert_eq!(errs.len(), 1, "expected exactly one error, got: {errs:#?}");
    errs.into_iter().next().unwrap()
}

fn headline(e: &ConfigError) -> String {
    e.to_string().lines().next().unwrap().to_string()
}

#[test]
fn valid_files_load_with_checked_values() {
    let s = load(ROUTES, POLICY).expect("valid");
    assert_eq!(s.tiers.len(), 3);
    assert_eq!(s.tier(s.routes.get(1).unwrap().tier).name, "admin");
    assert_eq!(s.tiers[2].max_queue_wait, Duration::from_millis(100));
    assert_eq!(s.tiers[2].max_share, 0.3);
    assert_eq!(s.tiers[0].max_share, 1.0, "default share");
    assert_eq!(s.shedding.retry_after_s, 2, "1.5 s rounds up");
    assert!(s.trust.may_set_tier("10.1.2.3".parse().unwrap()));
    assert!(s.trust.may_set_tier("127.0.0.1".parse().unwrap()));
    assert!(!s.trust.may_set_tier("127.0.0.2".parse().unwrap()));
    assert_eq!(s.clusters[0].sites.len(), 2);
    assert_eq!(s.server.threads, 2);
    assert!(s
        .summary()
        .contains("2 routes, 3 tiers, 1 clusters, 2 sites, 3 backends"));
}

#[test]
fn unknown_field_is_an_error_with_its_location() {
    let routes = ROUTES.replace("timeout = \"10s\"", "timeout = \"10s\"\nretries = 3");
    let e = only_error(&routes, POLICY);
    assert_eq!(
        headline(&e),
        "routes.toml:24:1: error: unknown field `retries`, expected one of `name`, `match`, `tier`, `cluster`, `timeout`, `retry_with_idempotency_key`, `inspect_limit`, `inspect_timeout`, `on_bad_body`, `max_body`"
    );
}

#[test]
fn unknown_field_in_policy_names_the_policy_file() {
    let policy = POLICY.replace("max_share = 0.3", "max_share = 0.3\nshare = 1");
    let e = only_error(ROUTES, &policy);
    assert!(
        headline(&e).starts_with("policy.toml:6:1: error: unknown field `share`"),
        "{e}"
    );
}

#[test]
fn unknown_tier_lists_the_known_ones() {
    let routes = ROUTES.replace("tier = \"admin\"", "tier = \"admni\"");
    let e = only_error(&routes, POLICY);
    assert_eq!(
        headline(&e),
        "routes.toml:28:8: error: unknown tier \"admni\" in `tier`: expected one of the policy's tiers: purchase, merchant, admin"
    );
}

#[test]
fn unknown_cluster_lists_the_known_ones() {
    let routes = ROUTES.replace("cluster = \"kred\"\ntimeout", "cluster = \"kerd\"\ntimeout");
    let e = only_error(&routes, POLICY);
    assert_eq!(
        headline(&e),
        "routes.toml:22:11: error: unknown cluster \"kerd\": expected one of the [clusters.<name>] in this file: kred"
    );
}

#[test]
fn bad_duration_says_what_a_duration_looks_like() {
    let routes = ROUTES.replace("\"500ms\"", "\"5 parsecs\"");
    let e = only_error(&routes, POLICY);
    assert_eq!(
        headline(&e),
        "routes.toml:6:19: error: invalid duration \"5 parsecs\" for `connect_timeout`: expected a number with a unit, like \"500ms\", \"2s\" or \"1m\""
    );
}

#[test]
fn bad_cidr_is_located_in_the_policy() {
    let policy = POLICY.replace("10.0.0.0/8", "10.0.0.0/33");
    let e = only_error(ROUTES, &policy);
    assert_eq!(
        headline(&e),
        "policy.toml:12:21: error: invalid CIDR \"10.0.0.0/33\" in `tier_header_from`: expected an address or network, like \"10.0.0.0/8\" or \"127.0.0.1\""
    );
}

#[test]
fn duplicate_route_name_points_at_the_second() {
    let routes = ROUTES.replace("name = \"admin\"", "name = \"checkout\"");
    let e = only_error(&routes, POLICY);
    assert_eq!(
        headline(&e),
        "routes.toml:26:8: error: duplicate route name \"checkout\": route names must be unique"
    );
}

#[test]
fn toml_syntax_error_gives_its_line_and_quotes_it() {
    let routes = ROUTES.replace("[[routes]]\nname = \"admin\"", "[[routes\nname = \"admin\"");
    let e = only_error(&routes, POLICY);
    assert_eq!(e.line, 25);
    assert!(
        headline(&e).starts_with("routes.toml:25:9: error: invalid table header"),
        "{e}"
    );
    assert!(
        e.to_string().contains("25 | [[routes"),
        "quotes the line: {e}"
    );
}

#[test]
fn share_outside_zero_one_is_refused() {
    let policy = POLICY.replace("max_share = 0.3", "max_share = 1.5");
    let e = only_error(ROUTES, &policy);
    assert_eq!(
        headline(&e),
        "policy.toml:5:13: error: `max_share` is 1.5: expected a share in (0, 1]"
    );
    let policy = POLICY.replace("max_share = 0.3", "max_share = 0.0");
    assert!(headline(&only_error(ROUTES, &policy)).contains("expected a share in (0, 1]"));
}

#[test]
fn site_without_backends_is_refused() {
    let routes = ROUTES.replace("backends = [\"127.0.0.1:9101\"]", "backends = []");
    let e = only_error(&routes, POLICY);
    assert_eq!(
        headline(&e),
        "routes.toml:16:12: error: site \"verizon\" has no backends: expected at least one ip:port"
    );
}

#[test]
fn bad_backend_address_says_ip_port() {
    let routes = ROUTES.replace("127.0.0.1:9002", "backend-2");
    let e = only_error(&routes, POLICY);
    assert!(
        headline(&e).ends_with("invalid backend address \"backend-2\": expected ip:port, like \"127.0.0.1:9001\" or \"[::1]:9001\""),
        "{e}"
    );
}

#[test]
fn a_backend_table_drains_it_and_a_bad_one_says_what_is_expected() {
    let routes = ROUTES.replace(
        "\"127.0.0.1:9002\"]",
        "{ addr = \"127.0.0.1:9002\", enabled = false }]",
    );
    let s = load(&routes, POLICY).expect("valid");
    assert_eq!(
        s.clusters[0].sites[0].drained,
        ["127.0.0.1:9002".parse().unwrap()]
    );
    let routes = ROUTES.replace("\"127.0.0.1:9002\"]", "{ address = \"127.0.0.1:9002\" }]");
    let e = only_error(&routes, POLICY);
    assert!(
        e.message
            .contains("unknown field `address`, expected `addr` or `enabled`"),
        "{e}"
    );
    assert_eq!(e.line, 11);
}

#[test]
fn xmlrpc_methods_and_inspection_settings_are_checked() {
    let routes = ROUTES.replace(
        "match = { path_prefix = \"/checkout/\" }",
        "match = { path = \"/xmlrpc\", xmlrpc_method = [\"add_invoice\", \"list_*\"] }\ninspect_limit = 2048\non_bad_body = \"reject\"",
    );
    let s = load(&routes, POLICY).expect("valid");
    let r = s.routes.get(0).unwrap();
    assert_eq!(r.matcher.xmlrpc.len(), 2);
    assert_eq!(
        r.inspect.as_ref().map(|i| (i.limit, i.reject_bad)),
        Some((2048, true))
    );
    let bad = routes.replace("\"list_*\"", "\"li*st\"");
    assert!(only_error(&bad, POLICY)
        .message
        .contains("xmlrpc_method \"li*st\": expected a method name"));
    let bad = routes.replace("inspect_limit = 2048", "inspect_limit = 100000");
    assert!(only_error(&bad, POLICY)
        .message
        .contains("`inspect_limit` is 100000: expected a whole number from 1 to 65536"));
    let bad = routes.replace("\"reject\"", "\"drop\"");
    assert!(only_error(&bad, POLICY)
        .message
        .contains("expected \"next\" (try the next route) or \"reject\" (400)"));
    let stray = ROUTES.replace("timeout = \"10s\"", "timeout = \"10s\"\ninspect_limit = 10");
    assert!(only_error(&stray, POLICY)
        .message
        .contains("body inspection settings on a route whose match has no `xmlrpc_method`"));
}

#[test]
fn duplicate_site_and_tier_names_are_refused() {
    let routes = ROUTES.replace("name = \"verizon\"", "name = \"skondal\"");
    assert!(headline(&only_error(&routes, POLICY))
        .contains("duplicate site \"skondal\" in cluster \"kred\""));
    let policy = POLICY.replace("\"merchant\", \"admin\"]", "\"admin\", \"admin\"]");
    let errs = load(ROUTES, &policy).unwrap_err();
    assert!(
        errs.to_string().contains("duplicate tier \"admin\""),
        "{errs}"
    );
}

#[test]
fn unknown_tier_in_policy_sections_is_refused() {
    let policy = POLICY.replace(
        "never_shed = [\"purchase\"]",
        "never_shed = [\"purchases\"]",
    );
    let e = only_error(ROUTES, &policy);
    assert!(
        headline(&e)
            .starts_with("policy.toml:8:15: error: unknown tier \"purchases\" in `never_shed`"),
        "{e}"
    );
}

#[test]
fn admission_for_unknown_cluster_and_bad_bounds_are_refused() {
    let policy = format!("{POLICY}\n[admission.kerd]\nmode = \"adaptive\"\n");
    assert!(only_error(ROUTES, &policy)
        .message
        .contains("[admission.kerd] names an unknown cluster"));
    let policy = format!("{POLICY}\n[admission.kred]\nmin = 10\nmax = 5\n");
    assert!(only_error(ROUTES, &policy)
        .message
        .contains("`min` (10) is above `max` (5)"));
    let policy = format!("{POLICY}\n[admission.kred]\nmode = \"fixed\"\n");
    assert!(only_error(ROUTES, &policy)
        .message
        .contains("mode = \"fixed\" needs `limit = N`"));
}

#[test]
fn rate_limit_must_name_a_known_route_and_a_valid_key() {
    let policy = format!(
        "{POLICY}\n[[rate_limit]]\nroute = \"chekout\"\nkey = \"client_ip\"\nper_second = 5\n"
    );
    assert!(only_error(ROUTES, &policy)
        .message
        .contains("unknown route \"chekout\""));
    let policy = format!(
        "{POLICY}\n[[rate_limit]]\nroute = \"checkout\"\nkey = \"cookie:x\"\nper_second = 5\n"
    );
    assert!(only_error(ROUTES, &policy)
        .message
        .contains("expected \"client_ip\" or \"header:<name>\""));
}

#[test]
fn lowercase_method_and_relative_path_are_refused() {
    let routes = ROUTES.replace("methods = [\"GET\", \"POST\"]", "methods = [\"get\"]");
    assert!(only_error(&routes, POLICY)
        .message
        .contains("expected an upper-case HTTP method"));
    let routes = ROUTES.replace(
        "path_prefix = \"/checkout/\"",
        "path_prefix = \"checkout/\"",
    );
    assert!(only_error(&routes, POLICY)
        .message
        .contains("must start with '/'"));
}

#[test]
fn every_problem_is_reported_at_once() {
    let routes = ROUTES
        .replace("tier = \"admin\"", "tier = \"admni\"")
        .replace("\"500ms\"", "\"soon\"");
    let policy = POLICY.replace("10.0.0.0/8", "ten");
    let errs = load(&routes, &policy).unwrap_err();
    assert_eq!(errs.0.len(), 3, "{errs}");
    assert!(errs.to_string().ends_with("3 errors"));
}

#[test]
fn missing_policy_file_names_the_routes_file_that_points_at_it() {
    let dir = std::env::temp_dir().join(format!("k2-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let routes = dir.join("routes.toml");
    std::fs::write(
        &routes,
        ROUTES.replace(
            "admin = \"127.0.0.1:9901\"",
            "admin = \"127.0.0.1:9901\"\npolicy = \"nope.toml\"",
        ),
    )
    .unwrap();
    let errs = super::load(&Paths {
        routes: routes.clone(),
        policy: None,
        dev_tls: None,
    })
    .unwrap_err();
    let text = errs.to_string();
    assert!(
        text.contains("nope.toml: error: cannot read file"),
        "{text}"
    );
    assert!(text.contains("named by [server].policy in"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn max_header_bytes_defaults_to_32_kib_and_is_range_checked() {
    assert_eq!(
        load(ROUTES, POLICY).unwrap().server.max_header_bytes,
        32 * 1024
    );
    let routes = ROUTES.replacen(
        "admin = \"127.0.0.1:9901\"",
        "admin = \"127.0.0.1:9901\"\nmax_header_bytes = 100",
        1,
    );
    let e = only_error(&routes, POLICY);
    assert!(
        headline(&e).ends_with(
            "error: `max_header_bytes` is 100: expected a whole number from 1024 to 1048576"
        ),
        "{e}"
    );
}

#[test]
fn idle_timeout_defaults_to_a_minute_and_is_at_most_an_hour() {
    let idle = |extra: &str| {
        ROUTES.replacen(
            "admin = \"127.0.0.1:9901\"",
            &format!("admin = \"127.0.0.1:9901\"\n{extra}"),
            1,
        )
    };
    assert_eq!(
        load(ROUTES, POLICY).unwrap().server.idle_timeout,
        Duration::from_secs(60)
    );
    let s = load(&idle("idle_timeout = \"5s\""), POLICY).unwrap();
    assert_eq!(s.server.idle_timeout, Duration::from_secs(5));
    let e = only_error(&idle("idle_timeout = \"2h\""), POLICY);
    assert!(
        headline(&e).ends_with("error: `idle_timeout` is longer than 1h: expected at most \"1h\""),
        "{e}"
    );
}

/// `ROUTES` with `extra` lines in `[server]`.
fn server_with(extra: &str) -> String {
    ROUTES.replacen(
        "admin = \"127.0.0.1:9901\"",
        &format!("admin = \"127.0.0.1:9901\"\n{extra}"),
        1,
    )
}

#[test]
fn edge_settings_have_safe_defaults() {
    let s = load(ROUTES, POLICY).unwrap().server;
    assert_eq!(s.header_timeout, Duration::from_secs(10));
    assert_eq!(s.drain_delay, Duration::from_secs(5));
    assert_eq!(s.max_connections, None, "derived from the open-file limit");
    assert_eq!(s.max_connections_per_client, 1000);
    assert_eq!(s.keepalive_requests, 1000);
    assert_eq!(s.keepalive_time, Duration::from_secs(60));
    let config = load(ROUTES, POLICY).unwrap();
    assert!(config.routes.iter().all(|r| r.max_body == 10 << 20));
}

#[test]
fn edge_settings_are_range_checked_with_their_place() {
    let s = load(
        &server_with("header_timeout = \"2s\"\ndrain_delay = \"0s\"\nmax_connections = 100\nmax_connections_per_client = 10"),
        POLICY,
    )
    .unwrap()
    .server;
    assert_eq!(
        (
            s.header_timeout,
            s.drain_delay,
            s.max_connections,
            s.max_connections_per_client
        ),
        (Duration::from_secs(2), Duration::ZERO, Some(100), 10)
    );
    for (extra, message) in [
        (
            "header_timeout = \"20m\"",
            "`header_timeout` is longer than 10m: expected at most \"10m\"",
        ),
        (
            "header_timeout = \"10ms\"",
            "`header_timeout` is shorter than 100ms: expected at least \"100ms\"",
        ),
        (
            "header_timeout = \"0s\"",
            "`header_timeout` must be greater than zero",
        ),
        (
            "drain_delay = \"1h\"",
            "`drain_delay` is longer than 5m: expected at most \"5m\"",
        ),
        (
            "drain_delay = \"soon\"",
            "invalid duration \"soon\" for `drain_delay`",
        ),
        (
            "max_connections = 0",
            "`max_connections` is 0: expected a whole number from 1 to 10000000",
        ),
        (
            "keepalive_requests = 0",
            "`keepalive_requests` is 0: expected a whole number from 1 to 1000000000",
        ),
        (
            "keepalive_time = \"2d\"",
            "`keepalive_time` is longer than 1day: expected at most \"1day\"",
        ),
        (
            "max_connections_per_client = -1",
            "`max_connections_per_client` is -1: expected a whole number from 1 to 10000000",
        ),
    ] {
        let e = only_error(&server_with(extra), POLICY);
        assert!(headline(&e).contains(message), "{extra}: {e}");
        assert!(headline(&e).contains(":4:"), "{extra}: no line in {e}");
    }
}

#[test]
fn max_body_is_per_route_and_range_checked() {
    let routes = ROUTES.replacen("[[routes]]\n", "[[routes]]\nmax_body = 2048\n", 1);
    let config = load(&routes, POLICY).unwrap();
    assert_eq!(config.routes.get(0).unwrap().max_body, 2048);
    let routes = ROUTES.replacen("[[routes]]\n", "[[routes]]\nmax_body = -5\n", 1);
    let e = only_error(&routes, POLICY);
    assert!(
        headline(&e).contains("`max_body` is -5: expected a whole number from 0 to 1073741824"),
        "{e}"
    );
}

#[test]
fn a_fleet_rate_limit_needs_a_store_and_the_store_its_fleet_size() {
    let rule = "\n[[rate_limit]]\nroute = \"checkout\"\nkey = \"client_ip\"\nper_second = 5\nscope = \"fleet\"\n";
    let e = only_error(ROUTES, &format!("{POLICY}{rule}"));
    assert!(headline(&e).contains("needs a [rate_limit_store]"), "{e}");
    let store = "\n[rate_limit_store]\nredis = \"redis://127.0.0.1:6379/0\"\n";
    let e = only_error(ROUTES, &format!("{POLICY}{store}{rule}"));
    assert!(headline(&e).contains("has no `fleet_size`"), "{e}");
    let store = "\n[rate_limit_store]\nredis = \"http://127.0.0.1:6379\"\nfleet_size = 3\n";
    let e = only_error(ROUTES, &format!("{POLICY}{store}{rule}"));
    assert!(headline(&e).contains("is not a Redis URL"), "{e}");
    let store = "\n[rate_limit_store]\nredis = \"redis://127.0.0.1:6379/0\"\nfleet_size = 3\n";
    let c = load(ROUTES, &format!("{POLICY}{store}{rule}")).expect("valid");
    let s = c.rate_limit_store.as_ref().unwrap();
    assert_eq!((s.fleet_size, s.timeout), (3, Duration::from_millis(50)));
    assert!(c.rate_limits[0].fleet);
    assert_eq!(c.rate_limits[0].missing, MissingKey::Bucket, "the default");
    // 600/s over 3 instances: a tenth of a second of one's share.
    let busy = RateLimit {
        per_second: 600,
        ..c.rate_limits[0].clone()
    };
    assert_eq!(
        (s.batch_for(&c.rate_limits[0]), s.batch_for(&busy)),
        (1, 20)
    );
    let bad = rule.replace(
        "scope = \"fleet\"",
        "scope = \"cluster\"\nmissing = \"skip\"",
    );
    let errs = load(ROUTES, &format!("{POLICY}{bad}")).unwrap_err().0;
    let said: Vec<String> = errs.iter().map(headline).collect();
    assert!(
        said[0].contains("expected \"instance\" or \"fleet\""),
        "{said:?}"
    );
    assert!(said[1].contains("expected \"bucket\""), "{said:?}");
}

#[test]
fn a_client_ip_key_believes_x_forwarded_for_only_from_trusted_proxies() {
    let policy = POLICY.replace(
        "[trust]\n",
        "[trust]\nforwarded_for_from = [\"10.0.0.0/8\"]\n",
    );
    let c = load(ROUTES, &policy).expect("valid");
    let mut h = http::HeaderMap::new();
    h.insert(
        "x-forwarded-for",
        "6.6.6.6, 203.0.113.9, 10.0.0.7".parse().unwrap(),
    );
    let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
    // From a trusted balancer: the first untrusted address from the right
    // (6.6.6.6 is whatever the client wrote itself).
    assert_eq!(
        c.trust.client_for_limits(ip("10.1.1.1"), &h),
        ip("203.0.113.9")
    );
    // From anyone else: the peer, whatever the header says.
    assert_eq!(
        c.trust.client_for_limits(ip("198.51.100.1"), &h),
        ip("198.51.100.1")
    );
    // A trusted peer without the header, or with garbage: the peer itself.
    let none = http::HeaderMap::new();
    assert_eq!(
        c.trust.client_for_limits(ip("10.1.1.1"), &none),
        ip("10.1.1.1")
    );
    h.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
    assert_eq!(
        c.trust.client_for_limits(ip("10.1.1.1"), &h),
        ip("10.1.1.1")
    );
}

/// Routes with `[[server.tls]]` entries on certificates written to `dir`.
fn with_tls(dir: &std::path::Path, entries: &str) -> String {
    let ca = crate::tls::dev::DevCa::new("test CA").unwrap();
    for (stem, serial) in [("a", 0x1700u64), ("b", 0x1701)] {
        let leaf = ca.issue(&["pay.example.test"], serial).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), leaf.cert_pem).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), leaf.key_pem).unwrap();
    }
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    let d = dir.display();
    ROUTES.replace(
        "[clusters.kred]",
        &format!(
            "{}\n[clusters.kred]",
            entries.replace("DIR", &d.to_string())
        ),
    )
}

#[test]
fn tls_listeners_group_by_address_and_the_first_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let routes = with_tls(
        dir.path(),
        r#"[[server.tls]]
listen = "127.0.0.1:8443"
cert = "DIR/a.pem"
key = "DIR/a.key"
server_names = ["Pay.Example.test"]

[[server.tls]]
listen = "127.0.0.1:8443"
cert = "DIR/b.pem"
key = "DIR/b.key"
server_names = ["*.shop.example.test"]
h2 = false
"#,
    );
    let c = load(&routes, POLICY).expect("valid");
    assert_eq!(c.server.tls.len(), 1);
    let l = &c.server.tls[0];
    assert!(!l.h2);
    assert_eq!(l.certs.len(), 2);
    assert!(l.certs[0].default && !l.certs[1].default);
    assert_eq!(l.certs[0].server_names, ["pay.example.test"]);
    assert_eq!(l.certs[0].pair.facts.dns_names, ["pay.example.test"]);
    assert_eq!(c.tls_files().len(), 4);
    // What `k2proxy check` prints: one line per certificate, a warning
    // within 14 days of its end.
    let not_after = l.certs[0].pair.facts.not_after_unix;
    let report = crate::tls::certificate_report(&c, not_after - 30 * 86400);
    assert_eq!(report.len(), 2);
    assert!(
        report[0]
            .0
            .starts_with("https 127.0.0.1:8443 [pay.example.test]: "),
        "{report:?}"
    );
    assert!(report[0].0.ends_with("(in 30.0 days)"), "{report:?}");
    assert!(!report[0].1);
    let report = crate::tls::certificate_report(&c, not_after - 13 * 86400);
    assert!(report[0].1, "13 days left warns");
}

#[test]
fn tls_mistakes_are_errors_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let entry = |extra: &str| {
        format!("[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"DIR/a.pem\"\nkey = \"DIR/a.key\"\n{extra}\n")
    };
    let cases = [
        (
            entry("h2 = true") + &entry("h2 = false"),
            "routes.toml:14:6: error: `h2` differs between the [[server.tls]] entries of 127.0.0.1:8443",
        ),
        (
            entry("default = true") + &entry("default = true"),
            "routes.toml:14:11: error: 127.0.0.1:8443 already has a default certificate",
        ),
        (
            entry("server_names = [\"pay example\"]"),
            "routes.toml:9:17: error: invalid server name \"pay example\"",
        ),
        (
            "[[server.tls]]\nlisten = \"127.0.0.1:8080\"\ncert = \"DIR/a.pem\"\nkey = \"DIR/a.key\"\n"
                .to_string(),
            "routes.toml:6:10: error: 127.0.0.1:8080 is also a plain HTTP or admin listener",
        ),
        (
            entry("").replace("a.key", "b.key"),
            "routes.toml:8:7: error: ",
        ),
    ];
    for (entries, want) in cases {
        let e = only_error(&with_tls(dir.path(), &entries), POLICY);
        assert!(
            headline(&e).starts_with(want),
            "{want}\n got {}",
            headline(&e)
        );
    }
    let e = only_error(
        &with_tls(dir.path(), &entry("").replace("a.key", "b.key")),
        POLICY,
    );
    assert!(
        headline(&e).contains("b.key does not match the certificate in"),
        "{e}"
    );
}

#[test]
fn a_sites_tls_needs_a_name_to_verify_and_both_halves_of_a_client_pair() {
    let dir = tempfile::tempdir().unwrap();
    let site = |tls: &str| {
        with_tls(dir.path(), "").replace(
            "backends = [\"127.0.0.1:9101\"]",
            &format!("backends = [\"127.0.0.1:9101\"]\ntls = {{ {tls} }}")
                .replace("DIR", &dir.path().display().to_string()),
        )
    };
    let e = only_error(&site("ca = \"DIR/ca.pem\""), POLICY);
    assert!(headline(&e).contains("`tls` needs `sni`"), "{e}");
    let e = only_error(
        &site("sni = \"b.test\", client_cert = \"DIR/a.pem\""),
        POLICY,
    );
    assert!(
        headline(&e).contains("mTLS needs both `client_cert` and `client_key`"),
        "{e}"
    );
    let e = only_error(&site("sni = \"b.test\", ca = \"DIR/none.pem\""), POLICY);
    assert!(headline(&e).contains("none.pem: No such file"), "{e}");
    let c = load(&site("sni = \"b.test\", ca = \"DIR/ca.pem\", client_cert = \"DIR/a.pem\", client_key = \"DIR/a.key\""), POLICY).expect("valid");
    let t = c.clusters[0].site_tls[1].as_ref().unwrap();
    assert!(t.verify && t.ca.is_some() && t.client.is_some());
    assert!(c.clusters[0].site_tls[0].is_none());
    // verify = false needs no name.
    let c = load(&site("verify = false"), POLICY).expect("valid");
    assert!(!c.clusters[0].site_tls[1].as_ref().unwrap().verify);
}

#[test]
fn standing_after_defaults_to_a_second_and_is_range_checked() {
    let config = load(ROUTES, POLICY).unwrap();
    assert_eq!(config.shedding.standing_after, Duration::from_secs(1));
    let with = |value: &str| {
        POLICY.replace(
            "retry_after = \"1500ms\"\n",
            &format!("retry_after = \"1500ms\"\nstanding_after = {value}\n"),
        )
    };
    let config = load(ROUTES, &with("\"3s\"")).unwrap();
    assert_eq!(config.shedding.standing_after, Duration::from_secs(3));
    for (value, message) in [
        (
            "\"50ms\"",
            "`standing_after` is shorter than 100ms: expected at least \"100ms\"",
        ),
        (
            "\"1m\"",
            "`standing_after` is longer than 30s: expected at most \"30s\"",
        ),
        (
            "\"later\"",
            "invalid duration \"later\" for `standing_after`",
        ),
    ] {
        let e = only_error(ROUTES, &with(value));
        assert!(headline(&e).contains(message), "{value}: {e}");
        assert!(
            headline(&e).contains("policy.toml:10:"),
            "{value}: no line in {e}"
        );
    }
}

#[test]
fn the_admission_state_file_is_off_by_default_relative_to_the_routes_and_never_empty() {
    assert_eq!(load(ROUTES, POLICY).unwrap().server.admission_state, None);
    let routes = src(
        "/etc/k2proxy/routes.toml",
        &server_with("admission_state = \"state/admission.json\""),
    );
    let s = load_sources(&routes, &src("policy.toml", POLICY))
        .unwrap()
        .server;
    assert_eq!(
        s.admission_state,
        Some(std::path::PathBuf::from(
            "/etc/k2proxy/state/admission.json"
        ))
    );
    let e = only_error(&server_with("admission_state = \" \""), POLICY);
    assert!(
        headline(&e).contains("`admission_state` is empty: expected a file path"),
        "{e}"
    );
    assert!(headline(&e).contains(":4:"), "no line in {e}");
}
