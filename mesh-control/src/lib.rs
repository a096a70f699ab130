//! mesh-control: nodemesh's control plane. Today: the workload certificate authority.

pub mod ca;
