//! Global fault injection, set at run time through the control API.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Faults for one Twirp method (or `*` for all).
///
/// A request's faults are its method's entry laid over the `*` entry, field by field: a
/// field the method's entry leaves at its default (`0`, `null`) takes the `*` value, so
/// `{"*": {"latency_ms": 100}, "CreateSIPParticipant": {"drop_after_rate": 1}}` gives
/// CreateSIPParticipant both. `latency_ms` and `latency_max_ms` are one setting: a method
/// entry with either takes neither from `*`. A method cannot switch a `*` fault off for
/// itself; set the fault per method instead.
///
/// Order for each request: latency, then `drop_rate`, then `error_rate`, then the request
/// is carried out, then `drop_after_rate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodFault {
    /// Fixed latency added before the request is carried out, in milliseconds (a client
    /// that gives up meanwhile sees nothing done yet; the request still runs afterwards).
    pub latency_ms: u64,
    /// With `latency_max_ms`, latency is uniform in `latency_ms..=latency_max_ms`.
    pub latency_max_ms: Option<u64>,
    /// Fraction (0..=1) of requests answered with `error_code`, without being carried out.
    pub error_rate: f64,
    /// Twirp code of injected errors (default `unavailable`).
    pub error_code: Option<String>,
    /// Fraction (0..=1) of requests whose connection is dropped without an answer, before
    /// they are carried out (nothing happens).
    pub drop_rate: f64,
    /// Fraction (0..=1) of requests carried out (rooms, dispatches, SIP participants
    /// created...) whose connection is then dropped without an answer: the response is lost.
    pub drop_after_rate: f64,
}

impl MethodFault {
    /// `self` laid over `base` (see the type's documentation).
    fn over(&self, base: &MethodFault) -> MethodFault {
        let rate = |own: f64, base: f64| if own > 0.0 { own } else { base };
        let (latency_ms, latency_max_ms) = if self.latency_ms > 0 || self.latency_max_ms.is_some() {
            (self.latency_ms, self.latency_max_ms)
        } else {
            (base.latency_ms, base.latency_max_ms)
        };
        MethodFault {
            latency_ms,
            latency_max_ms,
            error_rate: rate(self.error_rate, base.error_rate),
            error_code: self.error_code.clone().or_else(|| base.error_code.clone()),
            drop_rate: rate(self.drop_rate, base.drop_rate),
            drop_after_rate: rate(self.drop_after_rate, base.drop_after_rate),
        }
    }

    /// The rates, for validation.
    pub(crate) fn rates(&self) -> [f64; 3] {
        [self.error_rate, self.drop_rate, self.drop_after_rate]
    }
}

/// Faults on webhook delivery.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookFaults {
    /// Fraction (0..=1) of events delivered twice (same id, same body).
    pub duplicate_rate: f64,
    /// Fraction (0..=1) of events held back and delivered after the room's next event.
    pub reorder_rate: f64,
    /// While true, nothing is delivered (events wait, and may age out after 30 s).
    pub paused: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Per Twirp method name (`CreateSIPParticipant`) or `*`; a method's entry combines
    /// with `*` field by field (see [`MethodFault`]).
    pub methods: HashMap<String, MethodFault>,
    pub webhooks: WebhookFaults,
}

impl Faults {
    /// The faults that apply to `method`: its entry laid over `*` (defaults if neither).
    pub fn for_method(&self, method: &str) -> MethodFault {
        match (self.methods.get(method), self.methods.get("*")) {
            (Some(own), Some(all)) => own.over(all),
            (Some(f), None) | (None, Some(f)) => f.clone(),
            (None, None) => MethodFault::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(entries: &[(&str, MethodFault)]) -> Faults {
        Faults {
            methods: entries
                .iter()
                .map(|(m, f)| ((*m).to_owned(), f.clone()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_method_entry_combines_with_star_field_by_field() {
        let f = faults(&[
            (
                "*",
                MethodFault {
                    latency_ms: 100,
                    latency_max_ms: Some(300),
                    error_rate: 0.5,
                    error_code: Some("unavailable".into()),
                    ..Default::default()
                },
            ),
            (
                "CreateSIPParticipant",
                MethodFault {
                    drop_after_rate: 1.0,
                    error_code: Some("internal".into()),
                    ..Default::default()
                },
            ),
        ]);
        assert_eq!(
            f.for_method("CreateSIPParticipant"),
            MethodFault {
                latency_ms: 100,
                latency_max_ms: Some(300),
                error_rate: 0.5,
                error_code: Some("internal".into()),
                drop_rate: 0.0,
                drop_after_rate: 1.0,
            }
        );
        // Other methods get `*` as it is.
        assert_eq!(f.for_method("ListRooms"), f.methods["*"]);
    }

    #[test]
    fn latency_is_one_setting() {
        let f = faults(&[
            (
                "*",
                MethodFault {
                    latency_ms: 100,
                    latency_max_ms: Some(5_000),
                    ..Default::default()
                },
            ),
            (
                "GetParticipant",
                MethodFault {
                    latency_ms: 200,
                    ..Default::default()
                },
            ),
        ]);
        let got = f.for_method("GetParticipant");
        assert_eq!((got.latency_ms, got.latency_max_ms), (200, None));
    }

    #[test]
    fn no_entry_means_no_fault() {
        let f = faults(&[(
            "CreateRoom",
            MethodFault {
                drop_rate: 1.0,
                ..Default::default()
            },
        )]);
        assert_eq!(f.for_method("ListRooms"), MethodFault::default());
        assert_eq!(f.for_method("CreateRoom").drop_rate, 1.0);
    }
}
