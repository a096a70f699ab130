//! The value matchers policies are written with: Istio's string patterns and IP blocks.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// An Istio string pattern: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    text: String,
    kind: Kind,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Exact,
    Prefix,
    Suffix,
    Present,
}

/// Why a pattern was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PatternError {
    Empty,
    Wildcard,
}

impl Pattern {
    /// Parses a pattern; `lowercase` folds it for case-insensitive fields (hosts). A `*` anywhere
    /// but alone or at one end is refused: Istio would compare it literally, which is never what
    /// the author meant and would make a DENY silently miss.
    pub(crate) fn parse(text: &str, lowercase: bool) -> Result<Self, PatternError> {
        let text = if lowercase { text.to_ascii_lowercase() } else { text.to_owned() };
        let stars = text.bytes().filter(|&b| b == b'*').count();
        let kind = match (text.as_str(), stars) {
            ("", _) => return Err(PatternError::Empty),
            ("*", _) => Kind::Present,
            (_, 0) => Kind::Exact,
            (t, 1) if t.ends_with('*') => Kind::Prefix,
            (t, 1) if t.starts_with('*') => Kind::Suffix,
            _ => return Err(PatternError::Wildcard),
        };
        Ok(Self { text, kind })
    }

    /// Parses a value that must match exactly (methods).
    pub(crate) fn exact(text: &str) -> Self {
        Self { text: text.to_owned(), kind: Kind::Exact }
    }

    pub(crate) fn matches(&self, value: &[u8]) -> bool {
        let t = self.text.as_bytes();
        match self.kind {
            Kind::Exact => value == t,
            Kind::Prefix => value.starts_with(&t[..t.len() - 1]),
            Kind::Suffix => value.ends_with(&t[1..]),
            Kind::Present => !value.is_empty(),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

/// An IP block: a CIDR or a single address, v4 or v6.
#[derive(Clone, Debug)]
pub(crate) struct IpBlock {
    text: String,
    net: IpAddr,
    len: u8,
}

impl IpBlock {
    /// Parses `addr` or `addr/len`. Host bits are ignored (`10.1.2.3/8` is `10.0.0.0/8`), as
    /// Envoy does; a v4-mapped v6 block becomes the v4 block so it meets canonicalized peers.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                (a, Some(l.parse().ok()?))
            }
            Some(_) => return None,
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = len.unwrap_or(max);
        if len > max {
            return None;
        }
        let (net, len) = match addr {
            IpAddr::V6(v6) if len >= 96 && v6.to_ipv4_mapped().is_some() => {
                (IpAddr::V4(v6.to_ipv4_mapped()?), len - 96)
            }
            other => (other, len),
        };
        Some(Self { text: text.to_owned(), net: mask(net, len), len })
    }

    /// Returns whether the block holds `ip`, which the caller has canonicalized.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => mask(ip, self.len) == self.net,
            _ => false,
        }
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_prefix_suffix_presence() {
        for (pattern, value, want) in [
            ("/admin", "/admin", true),
            ("/admin", "/admin/", false),
            ("/admin*", "/admin", true),
            ("/admin*", "/admin/x", true),
            ("/admin*", "/adm", false),
            ("*.html", "/a/b.html", true),
            ("*.html", "/a/b.htm", false),
            ("*", "x", true),
            ("*", "", false),
        ] {
            let p = Pattern::parse(pattern, false).unwrap();
            assert_eq!(p.matches(value.as_bytes()), want, "{pattern} vs {value}");
        }
    }

    #[test]
    fn patterns_refuse_inner_or_double_wildcards() {
        assert_eq!(Pattern::parse("", false).unwrap_err(), PatternError::Empty);
        for bad in ["a*b", "*a*", "**", "a**"] {
            assert_eq!(Pattern::parse(bad, false).unwrap_err(), PatternError::Wildcard, "{bad}");
        }
    }

    #[test]
    fn lowercase_patterns_fold_case() {
        let p = Pattern::parse("*.Example.COM", true).unwrap();
        assert!(p.matches(b"www.example.com"));
    }

    #[test]
    fn ip_blocks_parse_and_contain() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (block, addr, want) in [
            ("10.0.0.0/8", "10.200.1.1", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3/8", "10.9.9.9", true),
            ("10.0.0.1", "10.0.0.1", true),
            ("10.0.0.1", "10.0.0.2", false),
            ("0.0.0.0/0", "1.2.3.4", true),
            ("0.0.0.0/0", "::1", false),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
            ("2001:db8::1", "2001:db8::1", true),
            ("::ffff:10.0.0.0/104", "10.1.1.1", true),
        ] {
            let b = IpBlock::parse(block).unwrap();
            assert_eq!(b.contains(ip(addr)), want, "{block} vs {addr}");
        }
    }

    #[test]
    fn bad_ip_blocks_are_refused() {
        for bad in
            ["", "10.0.0.0/33", "fd00::/129", "10.0.0.0/", "10.0.0/8", "host", "10.0.0.0/-1", "1.2.3.4/8/8"]
        {
            assert!(IpBlock::parse(bad).is_none(), "{bad}");
        }
    }
}
