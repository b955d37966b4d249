//! Pure domain logic: no I/O, no clocks read implicitly (time is passed in), unit-tested here.

pub mod call;
pub mod control;
pub mod delay;
pub mod events;
pub mod inbound;
pub mod metadata;
pub mod phone;
pub mod request;
pub mod routing;
pub mod sip_outcome;
pub mod subscription;
pub mod webhook;
pub mod window;

pub use call::*;
