//! callfleet as a library: the composition root that the binary, dev mode and the
//! integration tests share (`fleet`).

pub mod fleet;
