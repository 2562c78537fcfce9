//! Health: whether an endpoint is admitted. Active checks probe it ([`active`]); passive health
//! ejects it when the requests sent to it fail ([`passive`]), judged by the [`verdict`] of each
//! attempt.

pub mod active;
pub mod passive;
pub mod verdict;

pub use active::{Checks, HealthView};
pub use passive::Outliers;
pub use verdict::{is_failure_status, Failure, Observed, Verdict};
