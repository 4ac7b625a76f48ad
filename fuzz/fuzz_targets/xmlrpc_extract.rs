//! Fuzzes the XML-RPC methodName extractor (`proxy/src/xmlrpc.rs`, included
//! as is so this build does not need pingora): any body, complete or cut at
//! any point, must give an answer without panicking; a method found is never
//! empty, and once found in a prefix, the whole body gives the same one.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../proxy/src/xmlrpc.rs"]
mod xmlrpc;

use xmlrpc::{method_name, Extract};

fuzz_target!(|data: &[u8]| {
    let whole = method_name(data, true);
    if let Extract::Method(m) = &whole {
        assert!(!m.trim().is_empty());
    }
    // As the body arrives: the first answer that is not "need more" is final.
    let step = (data.len() / 16).max(1);
    let mut end = 0;
    while end < data.len() {
        end = (end + step).min(data.len());
        match method_name(&data[..end], end == data.len()) {
            Extract::NeedMore => continue,
            Extract::Method(m) => {
                assert_eq!(
                    whole,
                    Extract::Method(m),
                    "a prefix and the whole body disagree"
                );
                break;
            }
            Extract::Bad(_) => break,
        }
    }
});
