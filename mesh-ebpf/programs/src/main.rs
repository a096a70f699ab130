//! nodemesh's kernel programs (see ARCHITECTURE.md, "Capture").
//!
//! - `capture_connect4` / `capture_connect6` (cgroup/connect4, connect6) on the node's pods cgroup:
//!   rewrite the destination of enrolled pods' TCP connects to the pod's own outbound capture
//!   listener and remember the original destination by socket cookie.
//! - `record_established` (sock_ops) on the same cgroup: once the captured connection is
//!   established, re-keys the original destination by (netns cookie, client port), the key the
//!   proxy can compute from the socket it accepted.
//! - `capture_inbound` (sk_lookup), attached to each enrolled pod's netns: steers new TCP
//!   connections for the pod's address to the proxy's inbound listener in that netns, lets the
//!   proxy's own delivery connects through, and drops when the listener is gone (fail closed).
//! - `relay_in_kernel` (sk_skb stream verdict) on the sockets of plain TCP connections the proxy
//!   relays: moves what one socket receives straight to the send queue of its partner, so the
//!   proxy is not woken for the bytes of a connection it has already authorized.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, sk_action},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use mesh_ebpf_common::{
    Addr, DeliveryKey, EnrolledAddr, EnrolledPod, HBONE_PORT, OUTBOUND_CAPTURE_PORT, OrigDst, PROXY_MARK,
    PortKey, RELAY_LOW_WATER, RELAY_MAP_ENTRIES, RelayProgress, stats,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// cgroup/connect programs: 1 lets the connect proceed, 0 fails it with EPERM.
const CONNECT_PROCEED: i32 = 1;
const CONNECT_REFUSE: i32 = 0;

/// Enrolled pods by netns cookie: whose outbound connects are captured.
#[map]
static ENROLLED_NETNS: HashMap<u64, EnrolledPod> = HashMap::pinned(4096, 0);
/// Original destination by socket cookie, between connect and established.
#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);
/// Original destination by (netns cookie, client port), read and deleted by the proxy.
#[map]
static ORIG_DST_BY_PORT: LruHashMap<PortKey, OrigDst> = LruHashMap::pinned(65536, 0);
/// Destination ports never captured outbound (host byte order).
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);
/// Enrolled pod addresses: inbound connections to these are captured or dropped, never passed.
#[map]
static ENROLLED_ADDRS: HashMap<Addr, EnrolledAddr> = HashMap::pinned(4096, 0);
/// The proxy's inbound capture listener of each enrolled pod address.
#[map]
static INBOUND_LISTENERS: SockHash<Addr> = SockHash::pinned(4096, 0);
/// In-flight delivery connects of the proxy, by exact 4-tuple: let through to the app.
#[map]
static DELIVERIES: HashMap<DeliveryKey, u8> = HashMap::pinned(65536, 0);
/// Event counters, indexed by `mesh_ebpf_common::stats`.
#[map]
static CAPTURE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = CAPTURE_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// What a connect decision needs to know about one connect() call.
struct Connect {
    dst: Addr,
    /// Host byte order.
    dst_port: u16,
    family: u16,
}

/// Returns whether a connect of an enrolled pod must reach its destination unmodified.
#[inline(always)]
fn bypasses_capture(ctx: &SockAddrContext, c: &Connect) -> bool {
    // SAFETY: the verifier guarantees `sock_addr` and its `sk` are valid for this program type.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    if mark == PROXY_MARK {
        return true;
    }
    let loopback = match c.dst.v4_be() {
        Some(ip) => u32::from_be(ip) >> 24 == 127,
        None => c.dst.words == [0, 0, 0, 1u32.to_be()],
    };
    // SAFETY: a plain map lookup; the value is not kept.
    loopback || unsafe { EXCLUDED_PORTS.get(&c.dst_port) }.is_some()
}

/// Records the original destination of an enrolled pod's connect; returns false when it is
/// not enrolled or the connect bypasses capture.
#[inline(always)]
fn capture(ctx: &SockAddrContext, c: &Connect) -> Result<bool, ()> {
    // SAFETY: `ctx` is this program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a plain map lookup; the value is not kept.
    if unsafe { ENROLLED_NETNS.get(&netns) }.is_none() {
        return Ok(false);
    }
    if bypasses_capture(ctx, c) {
        count(stats::OUTBOUND_BYPASSED);
        return Ok(false);
    }
    // SAFETY: `ctx` is this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst { addr: c.dst, port: c.dst_port, family: c.family };
    if ORIG_DST_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        count(stats::OUTBOUND_RECORD_FAILED);
        warn!(ctx, "nodemesh: cannot record original destination; refusing connect");
        return Err(());
    }
    count(stats::OUTBOUND_REDIRECTED);
    debug!(ctx, "nodemesh: captured connect netns={} port={}", netns, c.dst_port);
    Ok(true)
}

#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the verifier guarantees the context pointer is valid.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return CONNECT_PROCEED;
    }
    let c = Connect {
        dst: Addr::from_v4_be(sa.user_ip4),
        dst_port: u16::from_be(sa.user_port as u16),
        family: AF_INET,
    };
    match capture(&ctx, &c) {
        Ok(true) => {
            // Separate volatile 4-byte stores: the verifier rejects a merged 8-byte store here.
            // SAFETY: both fields are writable for connect4 programs.
            unsafe {
                core::ptr::write_volatile(&mut sa.user_ip4, 0x7f00_0001u32.to_be());
                core::ptr::write_volatile(&mut sa.user_port, OUTBOUND_CAPTURE_PORT.to_be() as u32);
            }
            CONNECT_PROCEED
        }
        Ok(false) => CONNECT_PROCEED,
        Err(()) => CONNECT_REFUSE,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the verifier guarantees the context pointer is valid.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return CONNECT_PROCEED;
    }
    let dst = read_ip6(&sa.user_ip6);
    // A dual-stack socket connecting to an IPv4-mapped address really speaks IPv4.
    let family = if dst.v4_be().is_some() { AF_INET } else { AF_INET6 };
    let c = Connect { dst, dst_port: u16::from_be(sa.user_port as u16), family };
    match capture(&ctx, &c) {
        Ok(true) => {
            let target = if family == AF_INET {
                Addr::from_v4_be(0x7f00_0001u32.to_be())
            } else {
                Addr { words: [0, 0, 0, 1u32.to_be()] }
            };
            // SAFETY: these fields are writable for connect6 programs; one 4-byte store each.
            unsafe {
                core::ptr::write_volatile(&mut sa.user_ip6[0], target.words[0]);
                core::ptr::write_volatile(&mut sa.user_ip6[1], target.words[1]);
                core::ptr::write_volatile(&mut sa.user_ip6[2], target.words[2]);
                core::ptr::write_volatile(&mut sa.user_ip6[3], target.words[3]);
                core::ptr::write_volatile(&mut sa.user_port, OUTBOUND_CAPTURE_PORT.to_be() as u32);
            }
            CONNECT_PROCEED
        }
        Ok(false) => CONNECT_PROCEED,
        Err(()) => CONNECT_REFUSE,
    }
}

#[sock_ops]
pub fn record_established(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: `ctx` is this program's context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out before the entry is removed.
        if let Some(orig) = unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }.copied() {
            // SAFETY: `ctx` is this program's context.
            let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let key = PortKey::new(netns, ctx.local_port() as u16);
            if ORIG_DST_BY_PORT.insert(&key, &orig, 0).is_err() {
                count(stats::OUTBOUND_RECORD_FAILED);
            }
            let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
        }
    }
    1
}

/// Reads an IPv6 context field word by word: the verifier only allows context loads at constant
/// offsets, and LLVM would otherwise compute the field address with a variable offset.
#[inline(always)]
fn read_ip6(field: &[u32; 4]) -> Addr {
    // SAFETY: `field` points into the program context, valid for the program's run.
    unsafe {
        Addr {
            words: [
                core::ptr::read_volatile(&field[0]),
                core::ptr::read_volatile(&field[1]),
                core::ptr::read_volatile(&field[2]),
                core::ptr::read_volatile(&field[3]),
            ],
        }
    }
}

#[sk_lookup]
pub fn capture_inbound(ctx: SkLookupContext) -> u32 {
    // SAFETY: the verifier guarantees the context pointer is valid.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP || l.local_port == u32::from(HBONE_PORT) {
        return sk_action::SK_PASS;
    }
    let (local, remote) = if l.family == u32::from(AF_INET) {
        (Addr::from_v4_be(l.local_ip4), Addr::from_v4_be(l.remote_ip4))
    } else {
        (read_ip6(&l.local_ip6), read_ip6(&l.remote_ip6))
    };
    // SAFETY: a plain map lookup; the value is not kept.
    if unsafe { ENROLLED_ADDRS.get(&local) }.is_none() {
        return sk_action::SK_PASS;
    }
    let delivery = DeliveryKey {
        remote,
        local,
        remote_port: u16::from_be(l.remote_port),
        local_port: l.local_port as u16,
        _pad: 0,
    };
    // SAFETY: a plain map lookup; the value is not kept.
    if unsafe { DELIVERIES.get(&delivery) }.is_some() {
        count(stats::INBOUND_DELIVERY_PASSED);
        return sk_action::SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => {
            count(stats::INBOUND_ASSIGNED);
            sk_action::SK_PASS
        }
        Err(err) if err == -2 => {
            // ENOENT: the pod is enrolled but its listener is gone (proxy down): fail closed.
            count(stats::INBOUND_DROPPED_NO_LISTENER);
            sk_action::SK_DROP
        }
        Err(err) => {
            count(stats::INBOUND_ASSIGN_FAILED);
            warn!(&ctx, "nodemesh: inbound assign failed ({}); dropping", err);
            sk_action::SK_DROP
        }
    }
}

/// Sockets whose received bytes the kernel relays, by socket cookie; `relay_in_kernel` is
/// attached to this map. Not pinned: the sockets belong to this mesh-node process.
#[map]
static RELAY_RECEIVERS: SockHash<u64> = SockHash::with_max_entries(RELAY_MAP_ENTRIES, 0);
/// Where each receiver's bytes go: its partner socket, by the receiver's cookie.
#[map]
static RELAY_TARGETS: SockHash<u64> = SockHash::with_max_entries(RELAY_MAP_ENTRIES, 0);

/// How many bytes each receiver may have relayed in all (written by the proxy, only upwards).
#[map]
static RELAY_LIMITS: HashMap<u64, u64> = HashMap::with_max_entries(RELAY_MAP_ENTRIES, 0);
/// What was relayed for each receiver (written by this program only).
#[map]
static RELAY_PROGRESS: HashMap<u64, RelayProgress> = HashMap::with_max_entries(RELAY_MAP_ENTRIES, 0);
/// Cookies of receivers whose budget runs low or has run out, for the proxy.
#[map]
static RELAY_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[stream_verdict]
pub fn relay_in_kernel(ctx: SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    // A segment with no bytes is a FIN the TCP stack has already taken in (the proxy passes
    // the half-close on): there is nothing to move, and the kernel's sender would fail the
    // partner with EPIPE on an empty segment.
    if len == 0 {
        return sk_action::SK_DROP;
    }
    // SAFETY: `ctx` is this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain map lookups; per socket this program never runs concurrently with itself.
    let (Some(progress), Some(limit)) =
        (RELAY_PROGRESS.get_ptr_mut(&cookie), unsafe { RELAY_LIMITS.get(&cookie) }.copied())
    else {
        // The proxy adds both before the socket joins the receivers and removes them only
        // after it closed: without them the connection is gone.
        return sk_action::SK_DROP;
    };
    // SAFETY: the pointer is into the map value, valid while the program runs.
    let progress = unsafe { &mut *progress };
    let before = progress.redirected;
    let after = before + len;
    progress.redirected = after;
    let low = limit.saturating_sub(RELAY_LOW_WATER);
    if after > limit && progress.spent == 0 {
        // The partner has not kept up: the proxy stops this socket's relaying (bytes then
        // wait in its receive buffer, which holds the sender back) and moves the rest itself.
        // Until it has, the bytes keep going this way: never two ways at once.
        progress.spent = 1;
        let _ = RELAY_EVENTS.output::<u64>(&cookie, 0);
    } else if before < low && after >= low {
        let _ = RELAY_EVENTS.output::<u64>(&cookie, 0);
    }
    // The proxy adds a receiver only after its target, and a target leaves the map only when it
    // closes: a failed lookup (SK_DROP) means the partner is gone, and so is the connection.
    RELAY_TARGETS.redirect_skb(&ctx, cookie, 0) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
