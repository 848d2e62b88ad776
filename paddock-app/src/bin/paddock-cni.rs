//! `paddock-cni`: the chained CNI plugin that makes a pod's sandbox creation wait until the
//! Paddock node agent has intercepted the pod (see `paddock_app::node::cni`). Speaks the CNI
//! protocol: `CNI_*` environment, network configuration on stdin, result or error on stdout.

use std::io::{Read as _, Write as _};

use paddock_app::node::cni::{self, CniError, Invocation};

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(1024 * 1024)
        .read_to_end(&mut stdin)
        .map_err(|e| CniError {
            code: cni::code::IO_FAILURE,
            msg: "cannot read the network configuration".into(),
            details: e.to_string(),
        });
    let env = |k: &str| std::env::var(k).ok();
    let parsed = read.and_then(|_| Invocation::parse(&env, &stdin));
    let version = parsed
        .as_ref()
        .map_or_else(|_| "1.0.0".to_owned(), |i| i.conf.cni_version.clone());
    let result = parsed.and_then(|inv| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CniError {
                code: cni::code::IO_FAILURE,
                msg: "cannot start the async runtime".into(),
                details: e.to_string(),
            })?;
        runtime.block_on(cni::execute(&inv))
    });
    let mut out = std::io::stdout().lock();
    match result {
        Ok(serde_json::Value::Null) => {}
        Ok(v) => {
            let _ = writeln!(out, "{v}");
        }
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            // The runtime logs stderr next to the error.
            eprintln!("paddock-cni: {}: {}", e.msg, e.details);
            std::process::exit(1);
        }
    }
}
