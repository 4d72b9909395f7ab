fn main() {
    // The shared library is installed as libhandoff.so.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libhandoff.so");
}
