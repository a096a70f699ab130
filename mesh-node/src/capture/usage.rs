//! What the kernel side holds, for metrics: which programs are attached how many times, how
//! full each map is, and the programs' event counters.
//!
//! Maps are read through their pins with fresh descriptors, never under the locks the proxy
//! takes for its map operations, so a scrape never delays a connection.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::maps::{MapInfo, MapType};
use mesh_ebpf_common::{maps, programs};

use super::{Capture, LinkName};
use crate::proxy::kernel_relay::KernelRelay;

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    /// Entries present (for arrays, their fixed size); approximate while the map changes.
    pub entries: u64,
    pub max_entries: u64,
}

/// How many links attach one program, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub program: &'static str,
    pub attach_type: &'static str,
    pub links: u64,
}

/// A snapshot of the kernel side.
#[derive(Clone, Debug, Default)]
pub struct KernelUsage {
    /// The programs' event counters, summed over CPUs, by name.
    pub events: BTreeMap<&'static str, u64>,
    pub maps: Vec<MapFill>,
    pub programs: Vec<Attached>,
    /// Plain TCP connections by who relayed them (`None`: no kernel relay on this node).
    pub relayed: Option<crate::proxy::kernel_relay::RelayedConnections>,
}

/// Every map the object declares, all pinned by name.
const MAPS: [&str; 8] = [
    maps::ENROLLED_NETNS,
    maps::ORIG_DST_BY_COOKIE,
    maps::ORIG_DST_BY_PORT,
    maps::ENROLLED_ADDRS,
    maps::INBOUND_LISTENERS,
    maps::DELIVERIES,
    maps::EXCLUDED_PORTS,
    maps::CAPTURE_STATS,
];

impl Capture {
    /// Reads the kernel side's state (a few syscalls per map entry: call off the async
    /// runtime's worker threads, e.g. in `spawn_blocking`).
    pub fn usage(&self) -> KernelUsage {
        KernelUsage {
            events: self.stats(),
            maps: MAPS.iter().filter_map(|name| map_fill(&self.map_dir, name)).collect(),
            programs: attached(&self.links.installed(), self.kernel_relay().is_some()),
            relayed: self.kernel_relay().map(KernelRelay::snapshot),
        }
    }
}

/// Counts the installed links per program (the relay program's attachment to its map is not a
/// pinned link: it lives with this process).
fn attached(links: &[LinkName], kernel_relay: bool) -> Vec<Attached> {
    let mut out = vec![
        Attached { program: programs::CONNECT4, attach_type: "cgroup_inet4_connect", links: 0 },
        Attached { program: programs::CONNECT6, attach_type: "cgroup_inet6_connect", links: 0 },
        Attached { program: programs::SOCK_OPS, attach_type: "cgroup_sock_ops", links: 0 },
        Attached { program: programs::SK_LOOKUP, attach_type: "sk_lookup", links: 0 },
        Attached {
            program: programs::RELAY_VERDICT,
            attach_type: "sk_skb_stream_verdict",
            links: u64::from(kernel_relay),
        },
    ];
    for link in links {
        let at = match link {
            LinkName::Connect4 => 0,
            LinkName::Connect6 => 1,
            LinkName::SockOps => 2,
            LinkName::Pod(_) => 3,
        };
        out[at].links += 1;
    }
    out
}

fn map_fill(dir: &Path, name: &'static str) -> Option<MapFill> {
    let info = MapInfo::from_pin(dir.join(name)).ok()?;
    let max_entries = u64::from(info.max_entries());
    let entries = match info.map_type() {
        Ok(MapType::Array | MapType::PerCpuArray) => max_entries,
        _ => {
            let fd = info.fd().ok()?;
            count_keys(fd.as_fd(), info.key_size(), max_entries)
        }
    };
    Some(MapFill { map: name, entries, max_entries })
}

/// `union bpf_attr` as `BPF_MAP_GET_NEXT_KEY` reads it.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Counts a hash map's keys by walking them (at most `max` steps: a walk that races deletions
/// may restart, so the count is a gauge's approximation, never a loop without end).
fn count_keys(fd: BorrowedFd<'_>, key_size: u32, max: u64) -> u64 {
    let size = key_size as usize;
    let (mut key, mut next) = (vec![0u8; size.max(1)], vec![0u8; size.max(1)]);
    let mut count = 0u64;
    let mut first = true;
    while count < max {
        let mut attr = NextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the attr points at buffers of the map's key size that outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &mut attr as *mut NextKeyAttr,
                std::mem::size_of::<NextKeyAttr>(),
            )
        };
        if ret != 0 {
            break; // ENOENT: the last key was reached
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_counted_per_program() {
        let links =
            [LinkName::Connect4, LinkName::SockOps, LinkName::pod("demo", "a1"), LinkName::pod("demo", "a2")];
        let counted: Vec<_> = attached(&links, true).into_iter().map(|a| (a.program, a.links)).collect();
        assert_eq!(
            counted,
            [
                (programs::CONNECT4, 1),
                (programs::CONNECT6, 0),
                (programs::SOCK_OPS, 1),
                (programs::SK_LOOKUP, 2),
                (programs::RELAY_VERDICT, 1)
            ]
        );
    }
}
