pub mod admin;
pub mod clients;
pub mod import;
pub mod ops;
pub mod usage;
pub mod verify;
