use std::{
    collections::{BTreeSet, HashMap},
    os::unix::fs::PermissionsExt,
    sync::Arc,
    time::Instant,
};

use paddock_broker::auth::{
    AuthError, Authenticator, RunDirectory, Scope,
    rsa_session::{RsaSessionAuthenticator, RsaSessionConfig, RsaSessionError, encrypt_run_token},
};

use crate::support::assert_no_bearer;

#[derive(Debug)]
struct Runs(HashMap<String, String>);

impl RunDirectory for Runs {
    fn run_namespace(&self, run_id: &str) -> Option<String> {
        self.0.get(run_id).cloned()
    }
}

fn runs() -> Arc<dyn RunDirectory> {
    Arc::new(Runs(HashMap::from([(
        "run-1".to_owned(),
        "team-a".to_owned(),
    )])))
}

fn config(dir: &std::path::Path) -> RsaSessionConfig {
    let mut cfg = RsaSessionConfig::new(dir.join("keys").join("session.pem"));
    cfg.key_bits = 2048;
    cfg
}

#[tokio::test]
async fn round_trip_and_restart_reuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let started = Instant::now();
    let auth = RsaSessionAuthenticator::load_or_create(&cfg, runs()).expect("create");
    eprintln!("keygen took {:?}", started.elapsed());

    let mode = std::fs::metadata(&cfg.key_file)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        std::fs::read_to_string(&cfg.key_file)
            .expect("pem")
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );

    let token = encrypt_run_token(auth.public_key_pem(), "run-1").expect("encrypt");
    let id = auth.authenticate(&token).await.expect("authenticated");
    assert_eq!(id.subject, "run:run-1");
    assert_eq!(id.namespace, "team-a");
    assert_eq!(id.run.as_deref(), Some("run-1"));
    assert_eq!(id.backend, "rsa-session");
    assert_eq!(
        id.scopes,
        BTreeSet::from([Scope::ValidateEgress, Scope::SubstituteAuth])
    );
    // The cached path gives the same answer.
    assert_eq!(auth.authenticate(&token).await.expect("again"), id);

    // A "restart": a new instance from the same file uses the same key.
    let again = RsaSessionAuthenticator::load_or_create(&cfg, runs()).expect("reload");
    assert_eq!(again.public_key_pem(), auth.public_key_pem());
    assert_eq!(
        again
            .authenticate(&token)
            .await
            .expect("old token still valid")
            .run,
        id.run
    );

    let debug = format!("{auth:?} {cfg:?}");
    assert!(
        !debug.contains("PRIVATE KEY") && !debug.contains("PUBLIC KEY"),
        "{debug}"
    );
}

#[tokio::test]
async fn failures_are_typed_and_never_quote_the_bearer() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let a = RsaSessionAuthenticator::load_or_create(&config(dir_a.path()), runs()).expect("a");
    let b = RsaSessionAuthenticator::load_or_create(&config(dir_b.path()), runs()).expect("b");
    assert_ne!(a.public_key_pem(), b.public_key_pem());

    // Encrypted for another broker's key.
    let wrong_key = encrypt_run_token(b.public_key_pem(), "run-1").expect("encrypt");
    let err = a.authenticate(&wrong_key).await.expect_err("wrong key");
    assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
    assert_no_bearer(&err, &wrong_key);

    for garbage in [
        "not base64 at all!",
        "",
        "QUJD",
        &"A".repeat(344),
        &"A".repeat(5000),
    ] {
        let err = a.authenticate(garbage).await.expect_err("garbage");
        assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
        if !garbage.is_empty() {
            assert_no_bearer(&err, garbage);
        }
    }

    // Decrypts fine, but the directory does not know the run.
    let unknown = encrypt_run_token(a.public_key_pem(), "run-404").expect("encrypt");
    let err = a.authenticate(&unknown).await.expect_err("unknown run");
    assert!(matches!(err, AuthError::Forbidden(_)), "{err:?}");
    assert_no_bearer(&err, &unknown);

    assert!(matches!(
        encrypt_run_token(a.public_key_pem(), "bad id"),
        Err(RsaSessionError::RunId)
    ));
    assert!(matches!(
        encrypt_run_token("junk", "run-1"),
        Err(RsaSessionError::PublicKey(_))
    ));
}

#[test]
fn key_file_permissions_and_content_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    RsaSessionAuthenticator::load_or_create(&cfg, runs()).expect("create");

    std::fs::set_permissions(&cfg.key_file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let err = RsaSessionAuthenticator::load_or_create(&cfg, runs()).expect_err("group readable");
    assert!(
        matches!(err, RsaSessionError::KeyPermissions { mode: 0o640, .. }),
        "{err}"
    );

    std::fs::set_permissions(&cfg.key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(
        &cfg.key_file,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("corrupt");
    let err = RsaSessionAuthenticator::load_or_create(&cfg, runs()).expect_err("corrupt key");
    assert!(matches!(err, RsaSessionError::KeyFile { .. }), "{err}");

    let mut small = config(dir.path());
    small.key_bits = 1024;
    assert!(matches!(
        RsaSessionAuthenticator::load_or_create(&small, runs()),
        Err(RsaSessionError::KeySize(1024))
    ));
}

/// A key file and a token written by the broker before it moved to AWS-LC (the `rsa` crate,
/// PKCS#8 PEM, OAEP with SHA-256 and MGF1-SHA-256, empty label): upgrading must neither strand
/// a key file nor invalidate the tokens runs already hold.
#[tokio::test]
async fn key_files_and_tokens_from_before_aws_lc_still_work() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    std::fs::create_dir_all(cfg.key_file.parent().expect("parent")).expect("mkdir");
    std::fs::copy(data.join("rsa-session-legacy-key.pem"), &cfg.key_file).expect("copy key");
    std::fs::set_permissions(&cfg.key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let before = std::fs::read(&cfg.key_file).expect("key");
    // The file is used as it is, whatever keyBits says.
    cfg.key_bits = 4096;
    let auth = RsaSessionAuthenticator::load_or_create(&cfg, runs()).expect("legacy key loads");
    assert_eq!(
        std::fs::read(&cfg.key_file).expect("key"),
        before,
        "key file untouched"
    );
    assert!(format!("{auth:?}").contains("key_bits: 2048"), "{auth:?}");

    // Byte for byte the public key the old code printed (`session-key public`).
    let public = std::fs::read_to_string(data.join("rsa-session-legacy-public.pem")).expect("pub");
    assert_eq!(auth.public_key_pem(), public);

    let old_token = std::fs::read_to_string(data.join("rsa-session-legacy-token.txt"))
        .expect("token")
        .trim()
        .to_owned();
    let id = auth.authenticate(&old_token).await.expect("old token");
    assert_eq!(id.run.as_deref(), Some("run-1"));

    // Runs may hold the key in PKCS#1 form ("RSA PUBLIC KEY", from `openssl rsa
    // -RSAPublicKey_out`); tokens made with it decrypt the same.
    let pkcs1 = std::fs::read_to_string(data.join("rsa-session-legacy-public-pkcs1.pem"))
        .expect("pkcs1 pub");
    let token = encrypt_run_token(&pkcs1, "run-1").expect("encrypt with PKCS#1 key");
    assert_ne!(token, old_token, "OAEP is randomised");
    let id = auth.authenticate(&token).await.expect("pkcs1 token");
    assert_eq!(id.run.as_deref(), Some("run-1"));
}

#[test]
fn generated_sizes_are_the_ones_aws_lc_makes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.key_bits = 2560;
    let err = RsaSessionAuthenticator::load_or_create(&cfg, runs()).expect_err("odd size");
    assert!(matches!(err, RsaSessionError::KeyBits(2560)), "{err}");
    assert!(
        !cfg.key_file.exists(),
        "nothing written for a refused config"
    );
    cfg.key_bits = 9000;
    assert!(matches!(
        RsaSessionAuthenticator::load_or_create(&cfg, runs()),
        Err(RsaSessionError::KeySize(9000))
    ));
}
