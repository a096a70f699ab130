//! Types and constants shared by the kernel programs (`mesh-ebpf/programs`) and mesh-node.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and integer flags, so the
//! kernel and user space agree on the layout byte for byte. Addresses are kept as four
//! network-order 32-bit words; IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so one
//! map serves both families.
#![no_std]

/// Port of the per-pod outbound capture listener (`127.0.0.1:15001` in the pod netns).
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Port of the per-pod inbound plaintext capture listener (`127.0.0.1:15006` in the pod netns).
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// HBONE tunnel port; never captured inbound, so tunnels reach the proxy's real listener.
pub const HBONE_PORT: u16 = 15008;

/// `SO_MARK` carried by every socket the proxy opens: connect4/6 never capture them.
pub const PROXY_MARK: u32 = 0x539;
/// `SO_MARK` of inbound delivery sockets; pod routing sends marked replies back to the proxy.
pub const DELIVERY_MARK: u32 = 0x111;
/// Routing table (in each pod netns) that delivers packets marked [`DELIVERY_MARK`] locally.
pub const DELIVERY_ROUTE_TABLE: u32 = 133;

/// Names of the maps, as declared in the kernel programs and pinned by mesh-node.
pub mod maps {
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    pub const ORIG_DST_BY_PORT: &str = "ORIG_DST_BY_PORT";
    pub const ENROLLED_ADDRS: &str = "ENROLLED_ADDRS";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const DELIVERIES: &str = "DELIVERIES";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const CAPTURE_STATS: &str = "CAPTURE_STATS";
    pub const RELAY_RECEIVERS: &str = "RELAY_RECEIVERS";
    pub const RELAY_TARGETS: &str = "RELAY_TARGETS";
    pub const RELAY_LIMITS: &str = "RELAY_LIMITS";
    pub const RELAY_PROGRESS: &str = "RELAY_PROGRESS";
    pub const RELAY_EVENTS: &str = "RELAY_EVENTS";
}

/// Names of the programs in the object file.
pub mod programs {
    pub const CONNECT4: &str = "capture_connect4";
    pub const CONNECT6: &str = "capture_connect6";
    pub const SOCK_OPS: &str = "record_established";
    pub const SK_LOOKUP: &str = "capture_inbound";
    pub const RELAY_VERDICT: &str = "relay_in_kernel";
}

/// Entries of each kernel relay map: sockets of relayed connections, two per connection.
pub const RELAY_MAP_ENTRIES: u32 = 65536;
/// Bytes the kernel relays for a socket beyond what its partner has been seen to send on: the
/// most the kernel holds for one direction of a connection whose receiver is slow.
pub const RELAY_BUDGET: u64 = 4 * 1024 * 1024;
/// When this little of the budget is left the program tells the proxy, which extends the limit
/// if the partner keeps up.
pub const RELAY_LOW_WATER: u64 = RELAY_BUDGET / 2;

/// What the relay program has done for one receiving socket (written by the program only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayProgress {
    /// Bytes moved to the partner.
    pub redirected: u64,
    /// 1 once the limit was passed (reported once): the proxy takes the direction over.
    pub spent: u32,
    pub _pad: u32,
}

/// An IPv6 or IPv4-mapped address as four network-order words, exactly as the kernel's
/// `user_ip6` / `local_ip6` context fields hold it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Addr {
    pub words: [u32; 4],
}

impl Addr {
    /// Builds the IPv4-mapped form of a network-order IPv4 address.
    pub const fn from_v4_be(ip_be: u32) -> Self {
        Addr { words: [0, 0, 0x0000_ffff_u32.to_be(), ip_be] }
    }

    /// Returns the network-order IPv4 address if this is an IPv4-mapped address.
    pub const fn v4_be(&self) -> Option<u32> {
        if self.words[0] == 0 && self.words[1] == 0 && self.words[2] == 0x0000_ffff_u32.to_be() {
            Some(self.words[3])
        } else {
            None
        }
    }
}

/// Value of [`maps::ENROLLED_NETNS`]: an enrolled pod, keyed by its netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EnrolledPod {
    /// Index of the pod in mesh-node's table; appears in kernel log lines.
    pub pod_index: u32,
    /// Always zero; keeps the value 8 bytes.
    pub _reserved: u32,
}

/// Value of the original-destination maps: where a captured connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` (2) or `AF_INET6` (10): the family the app connected with.
    pub family: u16,
}

/// Key of [`maps::ORIG_DST_BY_PORT`]: the captured client socket, as the proxy sees it on accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortKey {
    pub netns_cookie: u64,
    /// The client's local port, host byte order (the peer port of the proxy's accepted socket).
    pub port: u16,
    pub _pad: [u8; 6],
}

impl PortKey {
    pub const fn new(netns_cookie: u64, port: u16) -> Self {
        PortKey { netns_cookie, port, _pad: [0; 6] }
    }
}

/// Key of [`maps::DELIVERIES`]: the exact 4-tuple of an in-flight delivery connect, as the
/// destination pod's sk_lookup sees it (remote = the proxy's bound client address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DeliveryKey {
    pub remote: Addr,
    pub local: Addr,
    /// Host byte order.
    pub remote_port: u16,
    /// Host byte order.
    pub local_port: u16,
    pub _pad: u32,
}

/// Value of [`maps::ENROLLED_ADDRS`]: a pod address whose inbound connections are captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EnrolledAddr {
    pub netns_cookie: u64,
}

/// Indexes of the per-CPU [`maps::CAPTURE_STATS`] array.
pub mod stats {
    /// Outbound connects redirected to the pod's 15001 listener.
    pub const OUTBOUND_REDIRECTED: u32 = 0;
    /// Outbound connects of enrolled pods left alone (loopback, excluded port, proxy mark).
    pub const OUTBOUND_BYPASSED: u32 = 1;
    /// Original destinations that could not be recorded (map full): the connect is refused.
    pub const OUTBOUND_RECORD_FAILED: u32 = 2;
    /// Inbound connections steered to the pod's 15006 listener.
    pub const INBOUND_ASSIGNED: u32 = 3;
    /// Inbound connections to an enrolled pod with no live listener: dropped (fail closed).
    pub const INBOUND_DROPPED_NO_LISTENER: u32 = 4;
    /// The proxy's own delivery connects, passed through to the app.
    pub const INBOUND_DELIVERY_PASSED: u32 = 5;
    /// Inbound connections whose assignment failed: dropped (fail closed).
    pub const INBOUND_ASSIGN_FAILED: u32 = 6;
    /// Number of entries in the array.
    pub const COUNT: u32 = 7;
    /// Prometheus label of each index.
    pub const NAMES: [&str; COUNT as usize] = [
        "outbound_redirected",
        "outbound_bypassed",
        "outbound_record_failed",
        "inbound_assigned",
        "inbound_dropped_no_listener",
        "inbound_delivery_passed",
        "inbound_assign_failed",
    ];
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers, and spell out their
    // padding, so every byte pattern the kernel writes is a valid value.
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for DeliveryKey {}
    unsafe impl aya::Pod for EnrolledAddr {}
    unsafe impl aya::Pod for RelayProgress {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Addr>(), 16);
        assert_eq!(core::mem::size_of::<EnrolledPod>(), 8);
        assert_eq!(core::mem::size_of::<OrigDst>(), 20);
        assert_eq!(core::mem::size_of::<PortKey>(), 16);
        assert_eq!(core::mem::size_of::<DeliveryKey>(), 40);
        assert_eq!(core::mem::size_of::<EnrolledAddr>(), 8);
        assert_eq!(core::mem::size_of::<RelayProgress>(), 16);
    }

    #[test]
    fn v4_mapped_round_trip() {
        let ip_be = u32::from_be_bytes([10, 1, 2, 3]).to_be();
        let a = Addr::from_v4_be(ip_be);
        assert_eq!(a.v4_be(), Some(ip_be));
        assert_eq!(Addr { words: [0, 0, 0, 1u32.to_be()] }.v4_be(), None);
    }
}
