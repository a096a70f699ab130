//! A packet capture on one interface of a netns (AF_PACKET), to prove what crosses a link.

use std::{
    ffi::CString,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::Context as _;

/// A capture running on a thread inside the netns.
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<std::io::Result<Vec<Vec<u8>>>>,
}

impl std::fmt::Debug for Sniffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sniffer").finish_non_exhaustive()
    }
}

/// Frames captured on a link.
#[derive(Debug)]
pub struct Capture {
    /// Every frame, Ethernet header first, in arrival order.
    pub frames: Vec<Vec<u8>>,
}

impl Capture {
    /// Returns whether any frame contains `needle`.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.frames.iter().any(|f| f.windows(needle.len()).any(|w| w == needle))
    }

    /// Returns the TCP payloads of frames to or from `port` (IPv4 over Ethernet).
    pub fn tcp_payloads(&self, port: u16) -> Vec<&[u8]> {
        self.frames
            .iter()
            .filter_map(|f| {
                let ip = f.get(14..)?;
                if f.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
                    return None;
                }
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let tcp = ip.get(ihl..)?;
                let ports = tcp.get(..4)?;
                let (src, dst) =
                    (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
                let offset = usize::from(tcp.get(12)? >> 4) * 4;
                let payload = tcp.get(offset..)?;
                ((src == port || dst == port) && !payload.is_empty()).then_some(payload)
            })
            .collect()
    }
}

impl Sniffer {
    /// Starts capturing every frame on `interface` of netns `netns`.
    pub fn start(netns: &str, interface: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = std::fs::File::open(crate::netns::path(netns))
            .with_context(|| format!("opening netns {netns}"))?;
        let interface = CString::new(interface)?;
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> std::io::Result<Vec<Vec<u8>>> {
            use std::os::fd::AsRawFd as _;
            // SAFETY: plain syscalls on values owned by this thread.
            unsafe {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    let err = std::io::Error::last_os_error();
                    let _ = ready_tx.send(Err(err.to_string()));
                    return Err(err);
                }
                let protocol = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol));
                if fd < 0 {
                    let err = std::io::Error::last_os_error();
                    let _ = ready_tx.send(Err(err.to_string()));
                    return Err(err);
                }
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = protocol;
                addr.sll_ifindex = libc::if_nametoindex(interface.as_ptr()) as i32;
                let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const timeout).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                if addr.sll_ifindex == 0
                    || libc::bind(
                        fd,
                        (&raw const addr).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    ) != 0
                {
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    let _ = ready_tx.send(Err(format!("binding to the interface: {err}")));
                    return Err(err);
                }
                let _ = ready_tx.send(Ok(()));
                let mut frames = Vec::new();
                let mut buf = vec![0u8; 65_536];
                while !flag.load(Ordering::Relaxed) {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 {
                        frames.push(buf[..n as usize].to_vec());
                    }
                }
                libc::close(fd);
                Ok(frames)
            }
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Sniffer { stop, thread }),
            Ok(Err(err)) => anyhow::bail!("packet capture on {netns}: {err}"),
            Err(_) => anyhow::bail!("packet capture thread died"),
        }
    }

    /// Stops and returns what was captured.
    pub fn stop(self) -> anyhow::Result<Capture> {
        self.stop.store(true, Ordering::Relaxed);
        let frames = self.thread.join().map_err(|_| anyhow::anyhow!("capture thread panicked"))??;
        Ok(Capture { frames })
    }
}
