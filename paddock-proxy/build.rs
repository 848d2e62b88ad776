//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! A missing object embeds nothing and a stale one is still embedded but flagged; the loader
//! then refuses with an error naming the command to run. This keeps unprivileged builds and
//! unit tests working on machines without the nightly toolchain.

use std::{
    env, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

fn newest_mtime(dir: &Path, newest: &mut Option<SystemTime>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            newest_mtime(&path, newest);
        } else if let Ok(m) = entry.metadata().and_then(|m| m.modified()) {
            println!("cargo:rerun-if-changed={}", path.display());
            if newest.is_none_or(|n| m > n) {
                *newest = Some(m);
            }
        }
    }
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("crate lives in the workspace")
        .to_path_buf();
    let object = env::var_os("PADDOCK_EBPF_OBJECT").map_or_else(
        || root.join("target/bpfel-unknown-none/release/paddock-ebpf"),
        PathBuf::from,
    );
    println!("cargo:rerun-if-env-changed=PADDOCK_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());

    let mut sources = None;
    newest_mtime(&root.join("paddock-ebpf/src"), &mut sources);
    newest_mtime(&root.join("paddock-common/src"), &mut sources);
    println!(
        "cargo:rerun-if-changed={}",
        root.join("paddock-ebpf/Cargo.toml").display()
    );

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("paddock-ebpf.o");
    let state = match fs::metadata(&object).and_then(|m| m.modified()) {
        Err(_) => {
            fs::write(&out, []).expect("write OUT_DIR");
            "missing"
        }
        Ok(built) => {
            fs::copy(&object, &out).expect("copy eBPF object");
            if sources.is_some_and(|s| s > built) {
                "stale"
            } else {
                "ok"
            }
        }
    };
    if state != "ok" {
        println!(
            "cargo:warning=eBPF object {state} at {}: run `cargo xtask build-ebpf`",
            object.display()
        );
    }
    println!("cargo:rustc-env=PADDOCK_EBPF_STATE={state}");
    println!("cargo:rustc-env=PADDOCK_EBPF_PATH={}", object.display());
}
