//! The RSA-OAEP session bearer as the broker reads it from an `Authorization` header: length
//! and base64 checks, then OAEP decryption with the broker's key and the run-id check. Only
//! the backend's public entry points are used, so the target does not depend on the RSA
//! implementation behind them.
//!
//! Input: byte 0 picks the mode. 0: the rest is the bearer as sent. 1: the rest, cut or
//! zero-padded to the key size, is a ciphertext (the decryption path on attacker bytes).
//! 2: the rest is a run id, encrypted with the public key; it must authenticate as that run.
//!
//! The key is a fixed 2048-bit test key (fixtures/), so every input reproduces exactly.
#![no_main]

use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use paddock_broker::auth::rsa_session::{
    RsaSessionAuthenticator, RsaSessionConfig, encrypt_run_token,
};
use paddock_broker::auth::{AuthError, Authenticator, RunDirectory};

const KEY_PEM: &str = include_str!("../fixtures/rsa_session_test_key.pem");
const KEY_BYTES: usize = 256;

/// Knows every run, so a token that decrypts to a valid run id authenticates.
#[derive(Debug)]
struct EveryRun;

impl RunDirectory for EveryRun {
    fn run_namespace(&self, _run_id: &str) -> Option<String> {
        Some("fuzz".into())
    }
}

struct Backend {
    rt: tokio::runtime::Runtime,
    auth: RsaSessionAuthenticator,
    _dir: tempfile::TempDir,
}

fn backend() -> &'static Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    B.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("session.pem");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("key file");
        std::io::Write::write_all(&mut file, KEY_PEM.as_bytes()).expect("write key");
        let mut config = RsaSessionConfig::new(&path);
        // No rate limit: every correctly sized input must reach the private-key operation.
        config.decrypts_per_second = u32::MAX;
        config.decrypt_burst = u32::MAX;
        let auth = RsaSessionAuthenticator::load_or_create(&config, Arc::new(EveryRun))
            .expect("test key loads");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        Backend {
            rt,
            auth,
            _dir: dir,
        }
    })
}

fn authenticate(bearer: &str) -> Result<Option<String>, AuthError> {
    let b = backend();
    b.rt.block_on(b.auth.authenticate(bearer)).map(|id| id.run)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let Ok(bearer) = std::str::from_utf8(rest) else {
                return;
            };
            match authenticate(bearer) {
                // Only a ciphertext of the broker's key can name a run.
                Ok(run) => assert!(run.is_some(), "an identity without a run"),
                Err(AuthError::Unauthenticated(_)) => {}
                Err(e) => panic!("unexpected answer: {e}"),
            }
        }
        1 => {
            let mut ciphertext = rest.to_vec();
            ciphertext.resize(KEY_BYTES, 0);
            match authenticate(&STANDARD.encode(&ciphertext)) {
                Ok(run) => assert!(run.is_some(), "an identity without a run"),
                Err(AuthError::Unauthenticated(_)) => {}
                Err(e) => panic!("unexpected answer: {e}"),
            }
        }
        _ => {
            let Ok(run) = std::str::from_utf8(rest) else {
                return;
            };
            let public = backend().auth.public_key_pem().to_owned();
            if let Ok(token) = encrypt_run_token(&public, run) {
                assert_eq!(
                    authenticate(&token).expect("own token authenticates"),
                    Some(run.to_owned()),
                    "token names another run"
                );
            }
        }
    }
});
