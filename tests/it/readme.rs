//! The README's code samples are the example files, verbatim: each
//! `<!-- PATH -->` marker is followed by a fenced block holding exactly
//! the file at PATH (which `cargo build --examples` / `make` build).
use std::path::Path;

#[test]
fn readme_samples_are_the_example_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut checked = 0;
    let mut rest = readme.as_str();
    while let Some(i) = rest.find("<!-- examples/") {
        rest = &rest[i + 5..];
        let path = &rest[..rest.find(" -->").expect("marker ends with -->")];
        let fence = rest.find("```").expect("a fenced block after the marker");
        let body_start = fence + rest[fence..].find('\n').expect("fence line") + 1;
        let body_len = rest[body_start..].find("\n```").expect("closing fence") + 1;
        let sample = &rest[body_start..body_start + body_len];
        let file = std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(sample, file, "README's copy of {path} differs from the file");
        checked += 1;
    }
    assert!(checked >= 1, "no example samples found in README.md");
}
