//! Loads nodemesh's kernel programs, attaches them, and owns their maps.
//!
//! Maps and links are pinned under `<bpffs>/nodemesh/<node>/`, so capture outlives a crash or
//! restart of mesh-node: while it is down, enrolled pods' connections hit closed listeners and
//! fail instead of bypassing the mesh. A restarted mesh-node reuses the pinned maps, attaches a
//! fresh generation of links, and only then retires the previous generation, so there is no
//! moment without capture.

mod links;
pub mod usage;

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkSkb, SockOps, links::FdLink},
};
use mesh_ebpf_common::{
    Addr, DeliveryKey, EnrolledAddr, EnrolledPod, OrigDst, PortKey, maps, programs, stats,
};

use links::PinnedLinks;
pub use links::{LinkError, LinkName};
pub use usage::KernelUsage;

use crate::proxy::kernel_relay::{KernelRelay, RelayMaps};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("eBPF object {path} not found: build it with `cargo xtask build-ebpf` or pass --bpf-object")]
    ObjectMissing { path: PathBuf },
    #[error("cannot load eBPF object {path}: {}", links::causes(source.as_ref()))]
    Load { path: PathBuf, source: BoxError },
    #[error("the eBPF object has no {what} {name}: is it from another nodemesh version?")]
    Missing { what: &'static str, name: &'static str },
    #[error("eBPF program {program}: cannot {action}: {}", links::causes(source.as_ref()))]
    Program { program: &'static str, action: &'static str, source: BoxError },
    #[error("eBPF map {map}: {}", links::causes(source.as_ref()))]
    Map { map: &'static str, source: Box<aya::maps::MapError> },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Links(#[from] LinkError),
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { map, source: Box::new(source) }
}

fn prog_err<E: Into<BoxError>>(
    program: &'static str,
    action: &'static str,
) -> impl FnOnce(E) -> CaptureError {
    move |source| CaptureError::Program { program, action, source: source.into() }
}

/// Where and how to install capture on this node.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub object: PathBuf,
    /// `<bpffs>/nodemesh/<node>`.
    pub pin_root: PathBuf,
    pub pods_cgroup: PathBuf,
    pub excluded_ports: Vec<u16>,
    /// Relay authorized plain TCP connections in the kernel (see `proxy::kernel_relay`).
    pub kernel_relay: bool,
}

/// What a restarted mesh-node found pinned from its predecessor.
#[derive(Debug, Default)]
pub struct Leftovers {
    pub netns_cookies: Vec<u64>,
    pub addrs: Vec<Ipv4Addr>,
}

/// The reader of the programs' aya-log records.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The loaded programs, their links and their maps.
pub struct Capture {
    ebpf: Mutex<Ebpf>,
    links: PinnedLinks,
    enrolled_netns: Mutex<HashMap<MapData, u64, EnrolledPod>>,
    orig_dst_by_port: Mutex<HashMap<MapData, PortKey, OrigDst>>,
    enrolled_addrs: Mutex<HashMap<MapData, Addr, EnrolledAddr>>,
    inbound_listeners: Mutex<SockHash<MapData, Addr>>,
    deliveries: Mutex<HashMap<MapData, DeliveryKey, u8>>,
    stats: PerCpuArray<MapData, u64>,
    /// `None` when turned off or when this kernel refused the relay program.
    kernel_relay: Option<KernelRelay>,
    /// The cgroup the programs are attached to (pods' processes run in its subtree).
    pods_cgroup: PathBuf,
    /// Where the maps are pinned (read for metrics with descriptors of their own).
    map_dir: PathBuf,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("links", &self.links).finish_non_exhaustive()
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing { what: "map", name })?;
    T::try_from(map).map_err(map_err(name))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing { what: "program", name })?
        .try_into()
        .map_err(prog_err(name, "use"))
}

/// Locks a mutex, recovering the data if another thread panicked while holding it: every map
/// operation is a single syscall, so the map is never left half-updated.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Capture {
    /// Loads the programs (reusing pinned maps), attaches the cgroup programs to the pods cgroup
    /// and retires links left by a previous mesh-node. Returns the capture and the reader of the
    /// programs' log records, which must be polled (and kept alive) by the caller.
    pub fn install(config: &CaptureConfig) -> Result<(Self, KernelLogger), CaptureError> {
        if !config.object.is_file() {
            return Err(CaptureError::ObjectMissing { path: config.object.clone() });
        }
        let links = PinnedLinks::open(&config.pin_root.join("links"))?;
        let map_dir = config.pin_root.join("maps");
        std::fs::create_dir_all(&map_dir)
            .map_err(|source| CaptureError::Open { path: map_dir.clone(), source })?;
        let load_err = |source: BoxError| CaptureError::Load { path: config.object.clone(), source };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .load_file(&config.object)
            .map_err(|e| load_err(e.into()))?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf).map_err(|e| load_err(e.into()))?;

        // bpf_link attachments to a cgroup always coexist with other programs; the kernel wants
        // no multi-attach flag for them ("Single" sends none).
        let cgroup = File::open(&config.pods_cgroup)
            .map_err(|source| CaptureError::Open { path: config.pods_cgroup.clone(), source })?;
        for (name, link) in
            [(programs::CONNECT4, LinkName::Connect4), (programs::CONNECT6, LinkName::Connect6)]
        {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name, "load"))?;
            let id = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(prog_err(name, "attach"))?;
            let fd_link = FdLink::try_from(prog.take_link(id).map_err(prog_err(name, "attach"))?)
                .map_err(prog_err(name, "attach"))?;
            links.install(&link, fd_link)?;
        }
        let name = programs::SOCK_OPS;
        let ops: &mut SockOps = program(&mut ebpf, name)?;
        ops.load().map_err(prog_err(name, "load"))?;
        let id = ops.attach(&cgroup, CgroupAttachMode::Single).map_err(prog_err(name, "attach"))?;
        let fd_link = FdLink::try_from(ops.take_link(id).map_err(prog_err(name, "attach"))?)
            .map_err(prog_err(name, "attach"))?;
        links.install(&LinkName::SockOps, fd_link)?;

        let lookup: &mut SkLookup = program(&mut ebpf, programs::SK_LOOKUP)?;
        lookup.load().map_err(prog_err(programs::SK_LOOKUP, "load"))?;

        let mut excluded: HashMap<MapData, u16, u8> = take_map(&mut ebpf, maps::EXCLUDED_PORTS)?;
        let stale: Vec<u16> = excluded.keys().filter_map(Result::ok).collect();
        for port in stale.iter().filter(|p| !config.excluded_ports.contains(p)) {
            excluded.remove(port).map_err(map_err(maps::EXCLUDED_PORTS))?;
        }
        for port in &config.excluded_ports {
            excluded.insert(port, 1, 0).map_err(map_err(maps::EXCLUDED_PORTS))?;
        }

        let kernel_relay = if config.kernel_relay {
            match install_kernel_relay(&mut ebpf) {
                Ok(relay) => Some(relay),
                Err(err) => {
                    tracing::warn!(error = %err, "kernel relay unavailable: the proxy relays plain TCP itself");
                    None
                }
            }
        } else {
            None
        };
        let capture = Capture {
            kernel_relay,
            enrolled_netns: Mutex::new(take_map(&mut ebpf, maps::ENROLLED_NETNS)?),
            orig_dst_by_port: Mutex::new(take_map(&mut ebpf, maps::ORIG_DST_BY_PORT)?),
            enrolled_addrs: Mutex::new(take_map(&mut ebpf, maps::ENROLLED_ADDRS)?),
            inbound_listeners: Mutex::new(take_map(&mut ebpf, maps::INBOUND_LISTENERS)?),
            deliveries: Mutex::new(take_map(&mut ebpf, maps::DELIVERIES)?),
            stats: take_map(&mut ebpf, maps::CAPTURE_STATS)?,
            ebpf: Mutex::new(ebpf),
            links,
            pods_cgroup: config.pods_cgroup.clone(),
            map_dir,
        };
        Ok((capture, logger))
    }

    /// Returns the pods a previous mesh-node left enrolled in the pinned maps.
    pub fn leftovers(&self) -> Leftovers {
        Leftovers {
            netns_cookies: lock(&self.enrolled_netns).keys().filter_map(Result::ok).collect(),
            addrs: lock(&self.enrolled_addrs)
                .keys()
                .filter_map(Result::ok)
                .filter_map(|a| a.v4_be().map(|ip| Ipv4Addr::from(u32::from_be(ip))))
                .collect(),
        }
    }

    /// Enrols a pod: its inbound listener goes into the sockhash first, then its address and
    /// netns are marked enrolled, then sk_lookup is attached to its netns (replacing the link of
    /// a previous mesh-node, if any). On failure nothing of the pod is left enrolled.
    pub fn enrol(
        &self,
        link: &LinkName,
        netns: &Path,
        netns_cookie: u64,
        ip: Ipv4Addr,
        inbound_listener: &impl AsRawFd,
        pod_index: u32,
    ) -> Result<(), CaptureError> {
        let result = self.try_enrol(link, netns, netns_cookie, ip, inbound_listener, pod_index);
        if result.is_err() {
            let _ = self.withdraw(Some(link), Some(netns_cookie), Some(ip));
        }
        result
    }

    fn try_enrol(
        &self,
        link: &LinkName,
        netns: &Path,
        netns_cookie: u64,
        ip: Ipv4Addr,
        inbound_listener: &impl AsRawFd,
        pod_index: u32,
    ) -> Result<(), CaptureError> {
        let addr = v4_addr(ip);
        lock(&self.inbound_listeners)
            .insert(addr, inbound_listener.as_raw_fd(), 0)
            .map_err(map_err(maps::INBOUND_LISTENERS))?;
        lock(&self.enrolled_addrs)
            .insert(addr, EnrolledAddr { netns_cookie }, 0)
            .map_err(map_err(maps::ENROLLED_ADDRS))?;
        lock(&self.enrolled_netns)
            .insert(netns_cookie, EnrolledPod { pod_index, _reserved: 0 }, 0)
            .map_err(map_err(maps::ENROLLED_NETNS))?;
        let netns_file =
            File::open(netns).map_err(|source| CaptureError::Open { path: netns.to_owned(), source })?;
        let mut ebpf = lock(&self.ebpf);
        let name = programs::SK_LOOKUP;
        let prog: &mut SkLookup = program(&mut ebpf, name)?;
        let id = prog.attach(netns_file).map_err(prog_err(name, "attach"))?;
        let fd_link = FdLink::from(prog.take_link(id).map_err(prog_err(name, "attach"))?);
        self.links.install(link, fd_link)?;
        Ok(())
    }

    /// Withdraws a pod: capture stops, then its sk_lookup link is detached. Entries that are
    /// already gone are not an error (withdrawing is idempotent).
    pub fn withdraw(
        &self,
        link: Option<&LinkName>,
        netns_cookie: Option<u64>,
        ip: Option<Ipv4Addr>,
    ) -> Result<(), CaptureError> {
        if let Some(cookie) = netns_cookie {
            ignore_missing(lock(&self.enrolled_netns).remove(&cookie))
                .map_err(map_err(maps::ENROLLED_NETNS))?;
        }
        if let Some(ip) = ip {
            let addr = v4_addr(ip);
            ignore_missing(lock(&self.enrolled_addrs).remove(&addr))
                .map_err(map_err(maps::ENROLLED_ADDRS))?;
            ignore_missing(lock(&self.inbound_listeners).remove(&addr))
                .map_err(map_err(maps::INBOUND_LISTENERS))?;
        }
        if let Some(link) = link {
            self.links.retire_all(link)?;
        }
        Ok(())
    }

    /// Returns the names of pod links pinned by this or an earlier mesh-node.
    pub fn pinned_pod_links(&self) -> Result<HashSet<LinkName>, CaptureError> {
        Ok(self.links.pinned_names()?.into_iter().filter(|l| matches!(l, LinkName::Pod(_))).collect())
    }

    /// Takes (reads and deletes) the original destination of a captured outbound connection,
    /// identified by the pod's netns cookie and the client's port.
    pub fn take_original_destination(&self, netns_cookie: u64, client_port: u16) -> Option<SocketAddr> {
        let key = PortKey::new(netns_cookie, client_port);
        let mut map = lock(&self.orig_dst_by_port);
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(SocketAddr::new(addr_to_ip(&orig.addr), orig.port))
    }

    /// Lets the proxy's delivery connect with this exact 4-tuple through sk_lookup.
    pub fn allow_delivery(&self, key: DeliveryKey) -> Result<(), CaptureError> {
        lock(&self.deliveries).insert(key, 1, 0).map_err(map_err(maps::DELIVERIES))
    }

    /// Removes a delivery once its SYN has passed (or the connect failed).
    pub fn forget_delivery(&self, key: &DeliveryKey) {
        let _ = lock(&self.deliveries).remove(key);
    }

    /// Returns the kernel-side event counters, summed over CPUs, by name.
    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
        (0..stats::COUNT)
            .map(|i| {
                let total = self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
                (stats::NAMES[i as usize], total)
            })
            .collect()
    }

    /// Returns the pinned links currently installed, for the admin endpoint.
    pub fn link_names(&self) -> Vec<String> {
        self.links.installed().into_iter().map(|l| l.to_string()).collect()
    }

    /// Returns the kernel relay of plain TCP connections, when installed.
    pub fn kernel_relay(&self) -> Option<&KernelRelay> {
        self.kernel_relay.as_ref()
    }

    /// Returns the cgroup the programs are attached to: a process is captured when it runs in
    /// its subtree (and in an enrolled netns).
    pub fn pods_cgroup(&self) -> &Path {
        &self.pods_cgroup
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// Returns the map form of an IPv4 address.
/// Loads the relay program and attaches it to its receivers map. Its maps are not pinned: they
/// hold this process's sockets, which close with it.
fn install_kernel_relay(ebpf: &mut Ebpf) -> Result<KernelRelay, CaptureError> {
    let name = programs::RELAY_VERDICT;
    let maps = RelayMaps {
        receivers: take_map(ebpf, maps::RELAY_RECEIVERS)?,
        targets: take_map(ebpf, maps::RELAY_TARGETS)?,
        limits: take_map(ebpf, maps::RELAY_LIMITS)?,
        progress: take_map(ebpf, maps::RELAY_PROGRESS)?,
        events: take_map(ebpf, maps::RELAY_EVENTS)?,
    };
    let verdict: &mut SkSkb = program(ebpf, name)?;
    verdict.load().map_err(prog_err(name, "load"))?;
    verdict.attach(maps.receivers.fd()).map_err(prog_err(name, "attach"))?;
    KernelRelay::new(maps).map_err(prog_err(name, "start its watchers"))
}

pub fn v4_addr(ip: Ipv4Addr) -> Addr {
    Addr::from_v4_be(u32::from(ip).to_be())
}

/// Returns the map form of any socket address's IP.
pub fn ip_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_addr(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_addr(v4),
            None => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                Addr { words: [w(0), w(4), w(8), w(12)] }
            }
        },
    }
}

fn addr_to_ip(addr: &Addr) -> IpAddr {
    match addr.v4_be() {
        Some(ip) => IpAddr::V4(Ipv4Addr::from(u32::from_be(ip))),
        None => {
            let mut octets = [0u8; 16];
            for (i, w) in addr.words.iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(octets.into())
        }
    }
}

/// Detaches and unpins everything a node's mesh-node installed (for `mesh-node cleanup`).
pub fn remove_all(pin_root: &Path) -> Result<usize, CaptureError> {
    let mut removed = 0;
    let links_dir = pin_root.join("links");
    if links_dir.is_dir() {
        removed += PinnedLinks::open(&links_dir)?.retire_everything()?;
    }
    let map_dir = pin_root.join("maps");
    if map_dir.is_dir() {
        for entry in std::fs::read_dir(&map_dir)
            .map_err(|source| CaptureError::Open { path: map_dir.clone(), source })?
        {
            let path = entry.map_err(|source| CaptureError::Open { path: map_dir.clone(), source })?.path();
            std::fs::remove_file(&path)
                .map_err(|source| CaptureError::Open { path: path.clone(), source })?;
            removed += 1;
        }
    }
    for dir in [&links_dir, &map_dir, &pin_root.to_path_buf()] {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_map_form() {
        for ip in ["10.1.2.3", "::ffff:10.1.2.3", "fd00::1", "::1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            let back = addr_to_ip(&ip_addr(ip));
            let expected = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
                v4 => v4,
            };
            assert_eq!(back, expected);
        }
    }
}
