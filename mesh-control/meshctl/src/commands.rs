//! One module per meshctl command.

pub mod check;
pub mod connectivity;
pub mod explain;
pub mod proxy_config;
pub mod status;
