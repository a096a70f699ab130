//! What nodemesh's kernel programs (`mesh-ebpf/programs`) need from the kernel, and probes of
//! it with real `bpf()` calls (aya's feature probes load a minimal program or create a small
//! map, exactly as the verifier will judge the real ones).
//!
//! The inventory below is read off the programs' source and object: keep it in step when a
//! program starts calling another helper or uses another map type (`llvm-objdump -d` on
//! `target/ebpf/.../mesh-ebpf` lists the `call N` helper ids per section).

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

use super::{Check, parse::KernelVersion};

/// The oldest kernel the programs load on: `record_established` (sock_ops) calls
/// `bpf_get_netns_cookie`, allowed there since 5.15. (Also: sk_lookup 5.9, ring buffers 5.8,
/// `bpf_get_netns_cookie` from cgroup/connect 5.7.)
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 15);

/// A program type the object holds, with its programs.
pub struct ProgramUse {
    pub name: &'static str,
    pub program_type: ProgramType,
    pub programs: &'static str,
    pub since: KernelVersion,
}

pub const PROGRAM_TYPES: [ProgramUse; 4] = [
    ProgramUse {
        name: "cgroup_sock_addr",
        program_type: ProgramType::CgroupSockAddr,
        programs: "capture_connect4, capture_connect6",
        since: KernelVersion::new(4, 17),
    },
    ProgramUse {
        name: "sock_ops",
        program_type: ProgramType::SockOps,
        programs: "record_established",
        since: KernelVersion::new(4, 13),
    },
    ProgramUse {
        name: "sk_lookup",
        program_type: ProgramType::SkLookup,
        programs: "capture_inbound",
        since: KernelVersion::new(5, 9),
    },
    // The kernel relay of plain TCP; mesh-node relays in the proxy where it does not load.
    ProgramUse {
        name: "sk_skb",
        program_type: ProgramType::SkSkb,
        programs: "relay_in_kernel",
        since: KernelVersion::new(4, 14),
    },
];

/// A helper and the program types that call it, each with the kernel that first allows it
/// there when that is what sets the minimum (`None`: as old as the program type).
pub struct HelperUse {
    pub name: &'static str,
    pub helper: BpfHelper,
    pub callers: &'static [(ProgramType, Option<KernelVersion>)],
}

const CONNECT: ProgramType = ProgramType::CgroupSockAddr;
const SOCK_OPS: ProgramType = ProgramType::SockOps;
const SK_LOOKUP: ProgramType = ProgramType::SkLookup;
const SK_SKB: ProgramType = ProgramType::SkSkb;

pub const HELPERS: [HelperUse; 12] = [
    HelperUse {
        name: "bpf_map_lookup_elem",
        helper: BpfHelper::BPF_FUNC_map_lookup_elem,
        callers: &[(CONNECT, None), (SOCK_OPS, None), (SK_LOOKUP, None), (SK_SKB, None)],
    },
    HelperUse {
        name: "bpf_map_update_elem",
        helper: BpfHelper::BPF_FUNC_map_update_elem,
        callers: &[(CONNECT, None), (SOCK_OPS, None)],
    },
    HelperUse {
        name: "bpf_map_delete_elem",
        helper: BpfHelper::BPF_FUNC_map_delete_elem,
        callers: &[(SOCK_OPS, None)],
    },
    HelperUse {
        name: "bpf_get_socket_cookie",
        helper: BpfHelper::BPF_FUNC_get_socket_cookie,
        callers: &[(CONNECT, None), (SOCK_OPS, None), (SK_SKB, None)],
    },
    HelperUse {
        name: "bpf_sk_redirect_hash",
        helper: BpfHelper::BPF_FUNC_sk_redirect_hash,
        callers: &[(SK_SKB, None)],
    },
    // The relay's budget reports.
    HelperUse {
        name: "bpf_ringbuf_output",
        helper: BpfHelper::BPF_FUNC_ringbuf_output,
        callers: &[(SK_SKB, Some(KernelVersion::new(5, 8)))],
    },
    HelperUse {
        name: "bpf_get_netns_cookie",
        helper: BpfHelper::BPF_FUNC_get_netns_cookie,
        callers: &[(CONNECT, Some(KernelVersion::new(5, 7))), (SOCK_OPS, Some(KernelVersion::new(5, 15)))],
    },
    HelperUse {
        name: "bpf_sk_assign",
        helper: BpfHelper::BPF_FUNC_sk_assign,
        callers: &[(SK_LOOKUP, Some(KernelVersion::new(5, 9)))],
    },
    HelperUse {
        name: "bpf_sk_release",
        helper: BpfHelper::BPF_FUNC_sk_release,
        callers: &[(SK_LOOKUP, None)],
    },
    // aya-log's kernel side writes log records into a ring buffer.
    HelperUse {
        name: "bpf_ringbuf_reserve",
        helper: BpfHelper::BPF_FUNC_ringbuf_reserve,
        callers: &[(CONNECT, Some(KernelVersion::new(5, 8))), (SK_LOOKUP, None)],
    },
    HelperUse {
        name: "bpf_ringbuf_submit",
        helper: BpfHelper::BPF_FUNC_ringbuf_submit,
        callers: &[(CONNECT, Some(KernelVersion::new(5, 8))), (SK_LOOKUP, None)],
    },
    HelperUse {
        name: "bpf_ringbuf_discard",
        helper: BpfHelper::BPF_FUNC_ringbuf_discard,
        callers: &[(CONNECT, Some(KernelVersion::new(5, 8))), (SK_LOOKUP, None)],
    },
];

/// A map type the object creates, with its maps.
pub struct MapUse {
    pub name: &'static str,
    pub map_type: MapType,
    pub maps: &'static str,
}

pub const MAP_TYPES: [MapUse; 6] = [
    MapUse {
        name: "hash",
        map_type: MapType::Hash,
        maps: "ENROLLED_NETNS, EXCLUDED_PORTS, ENROLLED_ADDRS, DELIVERIES, RELAY_LIMITS, RELAY_PROGRESS",
    },
    MapUse { name: "lru_hash", map_type: MapType::LruHash, maps: "ORIG_DST_BY_COOKIE, ORIG_DST_BY_PORT" },
    MapUse {
        name: "sockhash",
        map_type: MapType::SockHash,
        maps: "INBOUND_LISTENERS, RELAY_RECEIVERS, RELAY_TARGETS",
    },
    MapUse { name: "percpu_array", map_type: MapType::PerCpuArray, maps: "CAPTURE_STATS" },
    MapUse {
        name: "ringbuf",
        map_type: MapType::RingBuf,
        maps: "AYA_LOGS (kernel log records), RELAY_EVENTS",
    },
    MapUse { name: "array", map_type: MapType::Array, maps: ".rodata (AYA_LOG_LEVEL and constants)" },
];

/// What to tell someone whose kernel refused a probe.
fn upgrade_hint(since: Option<KernelVersion>) -> String {
    match since {
        Some(version) => format!(
            "needs Linux {}.{}+; nodemesh needs {}.{}+",
            version.major, version.minor, MIN_KERNEL.major, MIN_KERNEL.minor
        ),
        None => format!(
            "upgrade to Linux {}.{}+ built with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF",
            MIN_KERNEL.major, MIN_KERNEL.minor
        ),
    }
}

const PROBE_HINT: &str = "the bpf() syscall refused the probe: run as root with CAP_BPF and CAP_SYS_ADMIN (and not under a seccomp profile that blocks bpf)";

/// Probes each program type.
pub fn program_checks() -> Vec<Check> {
    PROGRAM_TYPES
        .iter()
        .map(|p| {
            let name = format!("program type {}", p.name);
            match is_program_supported(p.program_type) {
                Ok(true) => Check::pass(name, format!("loads ({})", p.programs)),
                Ok(false) => Check::fail(
                    name,
                    format!("not supported by this kernel ({} need it)", p.programs),
                    upgrade_hint(Some(p.since)),
                ),
                Err(err) => Check::fail(name, format!("cannot probe: {err}"), PROBE_HINT),
            }
        })
        .collect()
}

/// Probes each helper from each program type that calls it.
pub fn helper_checks() -> Vec<Check> {
    HELPERS
        .iter()
        .map(|h| {
            let name = format!("helper {}", h.name);
            let mut ok = Vec::new();
            let mut missing = Vec::new();
            let mut errors = Vec::new();
            for (program_type, since) in h.callers {
                let type_name = type_name(*program_type);
                match is_helper_supported(*program_type, h.helper) {
                    Ok(true) => ok.push(type_name),
                    Ok(false) => missing.push((type_name, *since)),
                    Err(err) => errors.push(format!("{type_name}: {err}")),
                }
            }
            if !errors.is_empty() {
                Check::fail(name, format!("cannot probe: {}", errors.join("; ")), PROBE_HINT)
            } else if let Some((_, since)) = missing.first() {
                let names: Vec<_> = missing.iter().map(|(n, _)| *n).collect();
                Check::fail(name, format!("not callable from {}", names.join(", ")), upgrade_hint(*since))
            } else {
                Check::pass(name, format!("callable from {}", ok.join(", ")))
            }
        })
        .collect()
}

/// Probes each map type.
pub fn map_checks() -> Vec<Check> {
    MAP_TYPES
        .iter()
        .map(|m| {
            let name = format!("map type {}", m.name);
            match is_map_supported(m.map_type) {
                Ok(true) => Check::pass(name, format!("created ({})", m.maps)),
                Ok(false) => Check::fail(
                    name,
                    format!("not supported by this kernel ({})", m.maps),
                    upgrade_hint(None),
                ),
                Err(err) => Check::fail(name, format!("cannot probe: {err}"), PROBE_HINT),
            }
        })
        .collect()
}

fn type_name(program_type: ProgramType) -> &'static str {
    PROGRAM_TYPES.iter().find(|p| p.program_type == program_type).map_or("?", |p| p.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inventory_is_consistent() {
        // Every caller is a program type the object holds, and no helper is listed twice.
        for helper in &HELPERS {
            for (program_type, since) in helper.callers {
                assert_ne!(type_name(*program_type), "?", "{}", helper.name);
                assert!(since.is_none_or(|v| v <= MIN_KERNEL), "{} is newer than MIN_KERNEL", helper.name);
            }
        }
        let mut names: Vec<_> = HELPERS.iter().map(|h| h.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), HELPERS.len());
        assert!(PROGRAM_TYPES.iter().all(|p| p.since <= MIN_KERNEL));
    }

    /// The built object (`cargo xtask build-ebpf`), if there is one.
    fn object() -> Option<aya_obj::Object> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/ebpf/bpfel-unknown-none/release/mesh-ebpf");
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!("skipped: no BPF object at {} (run `cargo xtask build-ebpf`)", path.display());
            return None;
        };
        Some(aya_obj::Object::parse(&bytes).expect("the BPF object parses"))
    }

    #[test]
    fn the_inventory_matches_the_built_object() {
        let Some(object) = object() else { return };
        // Helper calls: BPF_JMP|BPF_CALL with src_reg 0 (1 is a call to a BPF function).
        let called: std::collections::BTreeSet<i32> = object
            .functions
            .values()
            .flat_map(|f| &f.instructions)
            .filter(|insn| insn.code == 0x85 && insn.src_reg() == 0)
            .map(|insn| insn.imm)
            .collect();
        let listed: std::collections::BTreeSet<i32> = HELPERS.iter().map(|h| h.helper as i32).collect();
        assert_eq!(called, listed, "helper ids the object calls vs the ones `check` probes");

        let used: std::collections::BTreeSet<u32> = object.maps.values().map(|m| m.map_type()).collect();
        let probed: std::collections::BTreeSet<u32> = MAP_TYPES.iter().map(|m| m.map_type as u32).collect();
        assert_eq!(used, probed, "map types the object creates vs the ones `check` probes");

        let mut sections: Vec<String> =
            object.programs.values().map(|p| format!("{:?}", p.section)).collect();
        sections.sort();
        assert_eq!(
            sections,
            [
                "CgroupSockAddr { attach_type: Connect4 }",
                "CgroupSockAddr { attach_type: Connect6 }",
                "SkLookup",
                "SkSkbStream { kind: StreamVerdict }",
                "SockOps"
            ],
            "the program types `check` probes: {}",
            PROGRAM_TYPES.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        );
    }

    #[test]
    fn the_probes_tell_a_missing_helper_from_a_present_one() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: probing BPF needs root");
            return;
        }
        assert_eq!(is_helper_supported(SOCK_OPS, BpfHelper::BPF_FUNC_sk_assign).ok(), Some(false));
        assert_eq!(is_helper_supported(SK_LOOKUP, BpfHelper::BPF_FUNC_sk_assign).ok(), Some(true));
        assert_eq!(is_program_supported(ProgramType::SkLookup).ok(), Some(true));
    }
}
