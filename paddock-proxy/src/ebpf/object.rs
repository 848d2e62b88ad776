//! The embedded eBPF object and the bridge from aya-log records to tracing.

use std::{
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use aya::Ebpf;

use super::EbpfError;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/paddock-ebpf.o"));

/// The object bytes, or an error naming the command that builds them.
pub(crate) fn bytes() -> Result<&'static [u8], EbpfError> {
    match env!("PADDOCK_EBPF_STATE") {
        "ok" if !OBJECT.is_empty() => Ok(OBJECT),
        "stale" => Err(EbpfError::ObjectStale),
        _ => Err(EbpfError::ObjectMissing),
    }
}

/// Forwards `aya_log_ebpf` records to `tracing` (target `paddock::ebpf`).
#[derive(Debug, Clone, Copy)]
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: "paddock::ebpf", "{}", record.args());
    }

    fn flush(&self) {}
}

/// Keeps the log ring buffer open and drains it on a background thread. Dropping it stops the
/// thread; it must outlive program loading (aya-log pitfall: closing the map early breaks loads).
pub(crate) struct LogForwarder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogForwarder {
    pub(crate) fn start(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let mut logger = aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing).map_err(|e| {
            EbpfError::Load {
                reason: format!("eBPF log map: {e}"),
                hint: None,
            }
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("paddock-ebpf-log".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
                    // A bounded wait so a drop is noticed promptly.
                    if matches!(poll(&mut fds, PollTimeout::from(200u16)), Ok(n) if n > 0) {
                        logger.flush();
                    }
                }
            })
            .map_err(|e| EbpfError::Load {
                reason: format!("eBPF log thread: {e}"),
                hint: None,
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LogForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
