//! Polling a rarely ready future only when it asked to be polled.
//!
//! A connection's task races its server against the drain signal and the park timer. Every
//! wake-up of the task (several per request) polled all three, and polling the drain signal
//! (a `Shared` future: a lock, a waker comparison, then the signal's own `Notify`) and the
//! timer (a waker registration) cost more than the answer, "not yet". [`Quiet`] polls its
//! future with a waker of its own that notes the wake-up; until that waker fires, and while
//! the task's waker stays the same, a poll answers `Pending` at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

/// A future polled only after it woke its task, or when polled by a new task waker.
pub(crate) struct Quiet<F> {
    inner: F,
    registered: Option<Arc<Flag>>,
}

/// The waker handed to the inner future: notes the wake-up, then wakes the task.
struct Flag {
    woken: AtomicBool,
    task: Waker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<F> Quiet<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self {
            inner,
            registered: None,
        }
    }

    /// The future itself (to reset a timer, say). Its next poll goes through.
    pub(crate) fn inner_mut(&mut self) -> &mut F {
        self.registered = None;
        &mut self.inner
    }
}

impl<F: Future + Unpin> Future for Quiet<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if let Some(flag) = &this.registered
            && !flag.woken.load(Ordering::Acquire)
            && flag.task.will_wake(cx.waker())
        {
            return Poll::Pending;
        }
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(false),
            task: cx.waker().clone(),
        });
        let waker = Waker::from(Arc::clone(&flag));
        match Pin::new(&mut this.inner).poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(out) => {
                this.registered = None;
                Poll::Ready(out)
            }
            Poll::Pending => {
                this.registered = Some(flag);
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Counts its polls; ready once `ready` is set, and wakes whoever asked last when set.
    #[derive(Default)]
    struct Signal {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Signal {
        fn fire(&self) {
            self.ready.store(true, Ordering::Release);
            if let Some(w) = self.waker.lock().expect("waker").take() {
                w.wake();
            }
        }
    }

    struct Polled(Arc<Signal>);

    impl Future for Polled {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            if self.0.ready.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            *self.0.waker.lock().expect("waker") = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn polls_reach_the_future_only_after_it_woke_or_the_task_changed() {
        let signal = Arc::new(Signal::default());
        let mut quiet = Quiet::new(Polled(Arc::clone(&signal)));
        let task = Arc::new(Counting::default());
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        for _ in 0..5 {
            assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        }
        assert_eq!(signal.polls.load(Ordering::SeqCst), 1, "asked once");

        // Another task's waker: registered again.
        let other = Arc::new(Counting::default());
        let other_waker = Waker::from(Arc::clone(&other));
        let mut other_cx = Context::from_waker(&other_waker);
        assert!(Pin::new(&mut quiet).poll(&mut other_cx).is_pending());
        assert_eq!(signal.polls.load(Ordering::SeqCst), 2);

        // Firing wakes the task that asked last, and the next poll sees it.
        signal.fire();
        assert_eq!(other.wakes.load(Ordering::SeqCst), 1);
        assert_eq!(task.wakes.load(Ordering::SeqCst), 0);
        assert!(Pin::new(&mut quiet).poll(&mut other_cx).is_ready());
    }

    #[derive(Default)]
    struct Counting {
        wakes: AtomicUsize,
    }

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_timer_still_fires_and_can_be_reset() {
        let mut timer = Quiet::new(Box::pin(tokio::time::sleep(Duration::from_secs(5))));
        let start = tokio::time::Instant::now();
        tokio::select! {
            () = &mut timer => panic!("fired early"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        timer
            .inner_mut()
            .as_mut()
            .reset(start + Duration::from_secs(10));
        (&mut timer).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }
}
