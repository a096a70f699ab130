//! A source fix applied to Kubernetes 1.20's vendored `github.com/modern-go/reflect2` (v1.0.1)
//! before building, because under Go >= 1.18 it calls the runtime with the wrong signature:
//! reflect2 reaches `reflect.mapiterinit` by `go:linkname`, and Go 1.18 changed that function
//! from returning a heap iterator to filling one the caller passes. Unfixed, the API
//! server dies with SIGSEGV (`unexpected fault address`, in `mapiterinit`) the first time
//! json-iterator encodes a map, which creating any custom resource does. reflect2 v1.0.2 made
//! the same change upstream; Kubernetes itself only moved to it in 1.24.

use std::{fs, path::Path};

use anyhow::{Context as _, bail};

/// Recorded beside the binary: a cached binary without it was built before this fix and is
/// rebuilt. Change it whenever the fixes change.
pub const FIXES: &str = "reflect2 v1.0.1 map iteration for Go >= 1.18";

const DIR: &str = "vendor/github.com/modern-go/reflect2";

/// Each edit: the file, the exact v1.0.1 text, and its replacement.
const EDITS: [(&str, &str, &str); 3] = [
    (
        "unsafe_link.go",
        "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter\n",
        "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)\n",
    ),
    // The runtime writes a whole iterator into the one it is given: the struct must have Go
    // 1.19's full layout (reflect's `hiter`), not just the two fields reflect2 reads.
    (
        "unsafe_link.go",
        "\tvalue unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).\n\
         \t// rest fields are ignored\n}\n",
        "\tvalue unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).\n\
         \t// The rest as in Go 1.19's reflect.hiter: the runtime fills the whole struct.\n\
         \tt           unsafe.Pointer\n\
         \th           unsafe.Pointer\n\
         \tbuckets     unsafe.Pointer\n\
         \tbptr        unsafe.Pointer\n\
         \toverflow    *[]unsafe.Pointer\n\
         \toldoverflow *[]unsafe.Pointer\n\
         \tstartBucket uintptr\n\
         \toffset      uint8\n\
         \twrapped     bool\n\
         \tB           uint8\n\
         \ti           uint8\n\
         \tbucket      uintptr\n\
         \tcheckBucket uintptr\n}\n",
    ),
    (
        "unsafe_map.go",
        "\treturn &UnsafeMapIterator{\n\t\thiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),\n",
        "\tvar it hiter\n\tmapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)\n\
         \treturn &UnsafeMapIterator{\n\t\thiter:      &it,\n",
    ),
];

/// Applies the edits to the Kubernetes source `tree`. Fails, naming the file, when the vendored
/// text is not exactly what the edits expect (another Kubernetes version: check whether it still
/// needs them).
pub fn fix(tree: &Path) -> anyhow::Result<()> {
    for (file, from, to) in EDITS {
        let path = tree.join(DIR).join(file);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        fs::write(&path, apply(&text, from, to).with_context(|| path.display().to_string())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn apply(text: &str, from: &str, to: &str) -> anyhow::Result<String> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => bail!("expected reflect2 v1.0.1's text once, found it {n} times: {from:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of reflect2 v1.0.1 the edits touch, as vendored by Kubernetes 1.20.2.
    const LINK: &str = "//go:noescape\n//go:linkname mapiterinit reflect.mapiterinit\n\
        func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter\n\n\
        type hiter struct {\n\
        \tkey   unsafe.Pointer // Must be in first position.  Write nil to indicate iteration end (see cmd/internal/gc/range.go).\n\
        \tvalue unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).\n\
        \t// rest fields are ignored\n}\n";
    const MAP: &str = "func (type2 *UnsafeMapType) UnsafeIterate(obj unsafe.Pointer) MapIterator {\n\
        \treturn &UnsafeMapIterator{\n\
        \t\thiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),\n\
        \t\tpKeyRType:  type2.pKeyRType,\n";

    #[test]
    fn passes_the_iterator_in_as_go_1_18_expects() {
        let dir = std::env::temp_dir().join(format!("nodemesh-reflect2-{}", std::process::id()));
        fs::create_dir_all(dir.join(DIR)).unwrap();
        fs::write(dir.join(DIR).join("unsafe_link.go"), LINK).unwrap();
        fs::write(dir.join(DIR).join("unsafe_map.go"), MAP).unwrap();
        fix(&dir).unwrap();
        let link = fs::read_to_string(dir.join(DIR).join("unsafe_link.go")).unwrap();
        assert!(link.contains("func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)\n"));
        assert!(link.contains("\tcheckBucket uintptr\n}\n"), "{link}");
        let map = fs::read_to_string(dir.join(DIR).join("unsafe_map.go")).unwrap();
        assert!(map.contains("\tvar it hiter\n\tmapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)\n"));
        assert!(map.contains("\t\thiter:      &it,\n"), "{map}");

        // Applied twice, or to other text, it says so rather than building something unknown.
        let err = fix(&dir).unwrap_err();
        assert!(format!("{err:#}").contains("found it 0 times"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
