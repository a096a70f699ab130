//! What crosses the wire: an AF_PACKET capture of every interface of a node's netns (the
//! node-to-node link, the pods' veths, the bridge), reduced as it runs to a [`WireSummary`] of
//! the packets between two pods. Nothing is kept but counters, so a long capture costs no memory.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::Context as _;

/// The HBONE port: mutual TLS between meshed pods.
pub const HBONE_PORT: u16 = 15008;

/// What to look for: the two pods' addresses and the payload marker.
#[derive(Clone, Debug)]
pub struct WireFilter {
    pub client: Ipv4Addr,
    pub server: Ipv4Addr,
    pub marker: Vec<u8>,
}

/// What the capture saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WireSummary {
    /// IPv4 packets captured (any).
    pub packets: u64,
    /// TCP packets between the two pods.
    pub between: u64,
    /// Packets, of any kind, holding the marker.
    pub marker_in_clear: u64,
    /// TCP payload bytes from the client pod to the server pod's port 15008.
    pub tunnel_bytes: u64,
    /// Payloads to or from port 15008 that start with a TLS record header.
    pub tls_records: u64,
    /// The server-side ports of TCP packets between the pods that were not port 15008.
    pub other_ports: BTreeSet<u16>,
    /// Packets the kernel dropped because the capture fell behind: the capture is incomplete.
    pub dropped: u64,
}

impl WireSummary {
    /// Accounts for one IP packet (network header first).
    pub fn observe(&mut self, filter: &WireFilter, packet: &[u8]) {
        if packet.first().is_none_or(|b| b >> 4 != 4) || packet.len() < 20 {
            return;
        }
        self.packets += 1;
        if !filter.marker.is_empty() && packet.windows(filter.marker.len()).any(|w| w == filter.marker) {
            self.marker_in_clear += 1;
        }
        let (src, dst) = (ip_at(packet, 12), ip_at(packet, 16));
        let pair =
            (src == filter.client && dst == filter.server) || (src == filter.server && dst == filter.client);
        if !pair || packet[9] != 6 {
            return;
        }
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        let Some(tcp) = packet.get(ihl..).filter(|t| t.len() >= 20) else { return };
        self.between += 1;
        let (sport, dport) = (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]));
        let server_port = if src == filter.client { dport } else { sport };
        if server_port != HBONE_PORT {
            self.other_ports.insert(server_port);
            return;
        }
        let offset = usize::from(tcp[12] >> 4) * 4;
        let payload = tcp.get(offset..).unwrap_or_default();
        if payload.is_empty() {
            return;
        }
        if src == filter.client {
            self.tunnel_bytes += payload.len() as u64;
        }
        // A record header: content type (change_cipher_spec, alert, handshake, application
        // data), then the legacy version 3.1 or 3.3.
        if payload.len() >= 5
            && (0x14..=0x17).contains(&payload[0])
            && payload[1] == 3
            && matches!(payload[2], 1 | 3)
        {
            self.tls_records += 1;
        }
    }
}

fn ip_at(packet: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3])
}

/// A capture running on a thread inside a netns.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<std::io::Result<WireSummary>>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").finish_non_exhaustive()
    }
}

impl Capture {
    /// Starts capturing every interface of the netns at `netns` (meshctl's own without one).
    pub fn start(netns: Option<&Path>, filter: WireFilter) -> anyhow::Result<Self> {
        let netns_file = match netns {
            Some(path) => {
                Some(std::fs::File::open(path).with_context(|| format!("opening netns {}", path.display()))?)
            }
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || -> std::io::Result<WireSummary> {
            let fd = match open_socket(netns_file.as_ref()) {
                Ok(fd) => fd,
                Err(err) => {
                    let _ = ready_tx.send(Err(err.to_string()));
                    return Err(err);
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut summary = WireSummary::default();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let stopping = flag.load(Ordering::Acquire);
                // SAFETY: reading into our own buffer from our own socket.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    summary.observe(&filter, &buf[..n as usize]);
                } else if stopping {
                    // Drained: the receive timeout passed with nothing more queued.
                    summary.dropped = dropped(&fd)?;
                    return Ok(summary);
                }
            }
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Capture { stop, thread }),
            Ok(Err(err)) => anyhow::bail!("packet capture: {err} (meshctl needs root to capture)"),
            Err(_) => anyhow::bail!("the packet capture thread ended before it started"),
        }
    }

    /// Stops (after draining what is queued) and returns the summary.
    pub fn stop(self) -> anyhow::Result<WireSummary> {
        self.stop.store(true, Ordering::Release);
        let summary =
            self.thread.join().map_err(|_| anyhow::anyhow!("the packet capture thread panicked"))?;
        Ok(summary?)
    }
}

/// Opens an AF_PACKET socket (cooked: network header first) on every interface, from inside
/// `netns` when given. Runs on the capture's own thread, which it moves into the netns.
fn open_socket(netns: Option<&std::fs::File>) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain syscalls on values this thread owns; the fd is wrapped at once.
    unsafe {
        if let Some(ns) = netns
            && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let protocol = (libc::ETH_P_IP as u16).to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, i32::from(protocol));
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        // Room for bursts of large (offloaded) packets; root may exceed rmem_max.
        let size: libc::c_int = CAPTURE_BUFFER;
        let size_ptr = (&raw const size).cast();
        let size_len = std::mem::size_of::<libc::c_int>() as u32;
        if libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size_ptr, size_len) != 0 {
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, size_ptr, size_len);
        }
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// The capture socket's receive buffer.
const CAPTURE_BUFFER: libc::c_int = 64 << 20;

/// Returns how many packets the kernel dropped for the socket (`PACKET_STATISTICS`).
fn dropped(fd: &std::os::fd::OwnedFd) -> std::io::Result<u64> {
    // struct tpacket_stats { tp_packets, tp_drops }
    let mut stats = [0u32; 2];
    let mut len = std::mem::size_of_val(&stats) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `stats`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_STATISTICS,
            stats.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from(stats[1]))
}

/// `<linux/if_packet.h>`'s socket option for the packet counters.
const PACKET_STATISTICS: libc::c_int = 6;

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 2);

    fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0];
        p.extend(src.octets());
        p.extend(dst.octets());
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend([0; 8]);
        p.extend([0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        p.extend(payload);
        p
    }

    fn filter() -> WireFilter {
        WireFilter { client: A, server: B, marker: b"MARK".to_vec() }
    }

    #[test]
    fn tls_to_15008_counts_and_clear_text_or_other_ports_show() {
        let mut s = WireSummary::default();
        s.observe(&filter(), &tcp(A, B, 40000, HBONE_PORT, &[0x17, 3, 3, 0, 10, 1, 2, 3]));
        s.observe(&filter(), &tcp(B, A, HBONE_PORT, 40000, &[0x17, 3, 3, 0, 10]));
        s.observe(&filter(), &tcp(B, A, HBONE_PORT, 40000, &[]));
        assert_eq!((s.between, s.tunnel_bytes, s.tls_records, s.marker_in_clear), (3, 8, 2, 0));
        assert!(s.other_ports.is_empty());

        s.observe(&filter(), &tcp(A, B, 40001, 17080, b"xxMARKxx"));
        assert_eq!(s.marker_in_clear, 1);
        assert_eq!(s.other_ports, BTreeSet::from([17080]));
        // Replies name the server's port too.
        s.observe(&filter(), &tcp(B, A, 8080, 40002, b""));
        assert_eq!(s.other_ports, BTreeSet::from([8080, 17080]));
        // Other hosts' packets count only for the marker.
        s.observe(&filter(), &tcp(A, Ipv4Addr::new(9, 9, 9, 9), 1, 2, b"MARK"));
        assert_eq!((s.between, s.marker_in_clear), (5, 2));
        // Not IPv4, or truncated: ignored.
        s.observe(&filter(), &[0x60; 40]);
        s.observe(&filter(), &[0x45; 10]);
        assert_eq!(s.packets, 6);
    }
}
