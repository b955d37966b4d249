//! callfleet's shared core: the domain (pure), the ports it owns (traits), their adapters
//! (RabbitMQ, Redis, LiveKit and in-memory), typed configuration, telemetry and lifecycle.
//!
//! Production code depends on [`ports`]; [`adapters::Backends`] picks the adapters from
//! configuration in one place.

pub mod adapters;
pub mod callback;
pub mod calls;
pub mod config;
pub mod domain;
pub mod error;
pub mod lifecycle;
pub mod ports;
pub mod routing;
pub mod telemetry;

pub use error::ErrorClass;
