//! Builds the C fd-passing primitives in `csrc/` and binds their header.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/fdpass.c");
    println!("cargo:rerun-if-changed=csrc/fdpass.h");

    cc::Build::new()
        .file("csrc/fdpass.c")
        .define("_GNU_SOURCE", None)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("fdpass");

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindgen::Builder::default()
        .header("csrc/fdpass.h")
        .allowlist_function("fdpass_.*")
        .allowlist_var("FDPASS_.*")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on csrc/fdpass.h ({e}); install libclang-dev (make deps)"))
        .write_to_file(out.join("fdpass.rs"))
        .expect("write fdpass bindings");
}
