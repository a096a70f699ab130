//! Request paths as policies see them.

use std::borrow::Cow;

/// Returns `path` normalized the way [`super::check_request`] matches it: percent-encoded
/// unreserved characters decoded, runs of `/` merged, `.` and `..` segments resolved (RFC 3986
/// §5.2.4). Without this `/a/../admin`, `//admin` or `/%61dmin` would slip past a DENY on
/// `/admin` while the application still served `/admin`. Encoded `/` (`%2F`) stays encoded, as
/// Envoy's default does. The proxy may forward this form so the app sees what was authorized.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let suspicious = path.contains('%') || path.contains("//") || path.contains("/.");
    if !suspicious || !path.starts_with('/') {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            // Only the last segment decides whether the result ends with `/`.
            "" | "." => trailing = last,
            ".." => {
                out.pop();
                trailing = last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    normalized.push('/');
    normalized.push_str(&out.join("/"));
    if trailing && !out.is_empty() {
        normalized.push('/');
    }
    if normalized == path { Cow::Borrowed(path) } else { Cow::Owned(normalized) }
}

/// Decodes `%XX` where XX is an unreserved character (letters, digits, `-._~`): those mean the
/// same encoded or not, so an encoding must not change a policy's answer.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(decoded) = bytes.get(i + 1..i + 3).and_then(hex_pair)
            && (decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded))
        {
            out.push(char::from(decoded));
            i += 3;
            continue;
        }
        // `path` is a str, so copying a whole char at a time keeps `out` valid UTF-8.
        let len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + len]);
        i += len;
    }
    out
}

fn hex_pair(pair: &[u8]) -> Option<u8> {
    let digit = |b: u8| char::from(b).to_digit(16);
    u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_before_matching() {
        for (path, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/a/../admin", "/admin"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2", "/a%2"),
            ("/%zz", "/%zz"),
            ("/.well-known/x", "/.well-known/x"),
            ("/caf\u{e9}/%41", "/caf\u{e9}/A"),
            ("*", "*"),
        ] {
            assert_eq!(normalize_path(path), want, "{path}");
        }
        assert!(matches!(normalize_path("/plain/path"), Cow::Borrowed(_)));
    }
}
