//! Error classification shared by every layer: a worker decides what to do with a failure
//! from its class alone, never by matching messages.

use serde::{Deserialize, Serialize};

/// How a failure should be treated by whoever handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Transient: try again (in-process first, then broker-delayed).
    Retryable,
    /// Will never succeed as asked: fail the work with the reason.
    Permanent,
    /// The input itself is wrong: report it to the caller, never retry.
    BadInput,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Permanent => "permanent",
            ErrorClass::BadInput => "bad_input",
        }
    }
}
