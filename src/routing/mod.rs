//! Routing: the routing table and its life cycle. A [`Generation`] is the table built from one
//! validated configuration and one DNS answer ([`resolve`]), with its pools ([`pool`]) and the
//! state their policies read ([`deps`]); the [`Supervisor`] builds, publishes ([`Live`]), reloads
//! and retires generations.

pub mod deps;
pub mod generation;
pub mod pool;
pub mod resolve;
pub mod supervisor;
pub mod table;

pub use generation::{BuildError, Generation};
pub use pool::{Candidates, InflightGuard, Pool};
pub use supervisor::{ReloadError, ReloadHandle, ReloadRecord, Supervisor};
pub use table::{Live, Routes};
