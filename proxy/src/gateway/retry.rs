//! Whether a failed try may be sent again: the payment rule of DESIGN.md
//! ("no purchase may reach the backends twice") as one pure function.
//!
//! | failure | may retry when | budget |
//! |---|---|---|
//! | connect refused (nothing sent) | another backend or site can take it | not charged |
//! | other connect failure (a timeout: backend too busy to accept) | the same | charged |
//! | after connecting (bytes may have been read) | idempotent method, or the idempotency header on a route that allows it; and the response has not begun, it was not a timeout, the body can still be replayed, another backend or site can take it | charged |
//!
//! A refused connect cost the backend nothing: budgeting it would lose
//! purchases when a whole site dies (the retries of every request exceed any
//! share until health checks catch up); the list of tried backends bounds it
//! to one try per backend. A slow backend is not helped by a second request,
//! so timeouts after connecting are never retried.

/// Why a retry is allowed: the `reason` label of `k2_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    Connect,
    Idempotent,
    IdempotencyKey,
}

impl RetryReason {
    pub const ALL: [RetryReason; 3] = [
        RetryReason::Connect,
        RetryReason::Idempotent,
        RetryReason::IdempotencyKey,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::Idempotent => "idempotent",
            RetryReason::IdempotencyKey => "idempotency_key",
        }
    }
}

/// How far a failed try got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The connection was never made: nothing was sent.
    Connect { refused: bool },
    /// Connected: the backend may have read the request.
    Sent {
        /// `GET`, `PUT`, `DELETE`…: sending twice does no harm.
        idempotent_method: bool,
        /// The request has the idempotency header and its route allows
        /// retrying on it.
        idempotency_key: bool,
        /// A response status was seen or written downstream.
        response_began: bool,
        /// The failure was a read or write timeout.
        timed_out: bool,
        /// More body was sent than can be replayed.
        body_truncated: bool,
    },
}

/// One failed try, as the gateway saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub stage: Stage,
    /// An untried backend in this site, or another site, can take it.
    pub alternative: bool,
}

/// The decision: `Some(reason)` to retry. `budget` takes a retry from the
/// cluster's budget and is called only when the rule charges one.
pub fn decide(a: Attempt, budget: impl FnOnce() -> bool) -> Option<RetryReason> {
    if !a.alternative {
        return None;
    }
    let (reason, charged) = match a.stage {
        Stage::Connect { refused } => (RetryReason::Connect, !refused),
        Stage::Sent {
            idempotent_method,
            idempotency_key,
            response_began,
            timed_out,
            body_truncated,
        } => {
            if response_began || timed_out || body_truncated {
                return None;
            }
            let reason = if idempotent_method {
                RetryReason::Idempotent
            } else if idempotency_key {
                RetryReason::IdempotencyKey
            } else {
                return None;
            };
            (reason, true)
        }
    };
    (!charged || budget()).then_some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const SENT_POST: Stage = Stage::Sent {
        idempotent_method: false,
        idempotency_key: false,
        response_began: false,
        timed_out: false,
        body_truncated: false,
    };

    fn sent(f: impl FnOnce(&mut [&mut bool; 5])) -> Stage {
        let (mut m, mut k, mut r, mut t, mut b) = (false, false, false, false, false);
        f(&mut [&mut m, &mut k, &mut r, &mut t, &mut b]);
        Stage::Sent {
            idempotent_method: m,
            idempotency_key: k,
            response_began: r,
            timed_out: t,
            body_truncated: b,
        }
    }

    /// (decision, whether the budget was asked) with `budget_left`.
    fn run(stage: Stage, alternative: bool, budget_left: bool) -> (Option<RetryReason>, bool) {
        let asked = Cell::new(false);
        let d = decide(Attempt { stage, alternative }, || {
            asked.set(true);
            budget_left
        });
        (d, asked.get())
    }

    #[test]
    fn a_refused_connect_is_retried_without_charging_the_budget() {
        let refused = Stage::Connect { refused: true };
        assert_eq!(
            run(refused, true, false),
            (Some(RetryReason::Connect), false)
        );
    }

    #[test]
    fn another_connect_failure_is_retried_within_the_budget() {
        let timeout = Stage::Connect { refused: false };
        assert_eq!(run(timeout, true, true), (Some(RetryReason::Connect), true));
        assert_eq!(run(timeout, true, false), (None, true));
    }

    #[test]
    fn nothing_is_retried_without_somewhere_else_to_go() {
        for stage in [Stage::Connect { refused: true }, sent(|f| *f[0] = true)] {
            assert_eq!(run(stage, false, true), (None, false), "{stage:?}");
        }
    }

    #[test]
    fn a_purchase_without_a_key_is_never_sent_twice() {
        assert_eq!(run(SENT_POST, true, true), (None, false));
    }

    #[test]
    fn an_idempotent_method_is_retried_within_the_budget() {
        let get = sent(|f| *f[0] = true);
        assert_eq!(run(get, true, true), (Some(RetryReason::Idempotent), true));
        assert_eq!(run(get, true, false), (None, true));
    }

    #[test]
    fn the_idempotency_header_on_an_allowing_route_is_retried_within_the_budget() {
        let keyed = sent(|f| *f[1] = true);
        assert_eq!(
            run(keyed, true, true),
            (Some(RetryReason::IdempotencyKey), true)
        );
        assert_eq!(run(keyed, true, false), (None, true));
    }

    #[test]
    fn never_once_the_response_began_after_a_timeout_or_with_a_truncated_body() {
        for blocker in 2..5 {
            for key in [0, 1] {
                let stage = sent(|f| {
                    *f[key] = true;
                    *f[blocker] = true;
                });
                assert_eq!(run(stage, true, true), (None, false), "{stage:?}");
            }
        }
    }
}
