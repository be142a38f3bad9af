//! HTTP routes, one module per resource. `common` holds what the admin routes share.

pub mod audit;
pub mod clients;
pub mod common;
pub mod consumers;
pub mod import;
pub mod invitations;
pub mod keys;
pub mod leaks;
pub mod ops;
pub mod plans;
pub mod usage;
pub mod users;
pub mod verify;
pub mod webhooks;
