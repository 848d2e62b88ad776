//! hyper's timer for one HTTP/1.1 agent connection: one runtime timer, kept for the
//! connection's life.
//!
//! hyper's HTTP/1.1 server bounds the wait for each request head with a timer it asks for
//! when the head starts and drops once it is read: with `TokioTimer`, a new boxed timer per
//! request, inserted into the runtime's timer wheel and removed again (a lock each), for a
//! deadline that is almost always the previous one moved on. [`ConnectionTimer`] hands hyper
//! the connection's one runtime timer instead, moved to each new deadline. A later deadline
//! only updates the registered entry (the wheel moves it when its old time comes), so a
//! request costs no wheel operation.
//!
//! hyper's server holds at most one of these timers at a time (the head's); should it ask
//! for a second while one is out, the second gets a timer of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use super::upstream::lock;

type Spare = Arc<Mutex<Option<Pin<Box<Sleep>>>>>;

/// A [`hyper::rt::Timer`] that reuses one runtime timer for its connection.
#[derive(Clone, Default)]
pub(crate) struct ConnectionTimer {
    /// The runtime timer while no head is being read.
    spare: Spare,
}

impl std::fmt::Debug for ConnectionTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionTimer").finish_non_exhaustive()
    }
}

impl ConnectionTimer {
    /// Drops the runtime timer while no head is being read (the connection parks).
    pub(crate) fn clear(&self) {
        *lock(&self.spare) = None;
    }
}

impl hyper::rt::Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let inner = match lock(&self.spare).take() {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Box::pin(Lent {
            inner: Some(inner),
            spare: Arc::clone(&self.spare),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Lent>() {
            Some(lent) => lent.get_mut().reset(new_deadline),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    /// The runtime's clock, as `TokioTimer`'s: a paused test clock applies here too.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// The connection's runtime timer, lent to hyper until it drops it.
struct Lent {
    /// `None` only while being dropped.
    inner: Option<Pin<Box<Sleep>>>,
    spare: Spare,
}

impl Lent {
    fn reset(&mut self, deadline: Instant) {
        if let Some(inner) = &mut self.inner {
            inner
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
        }
    }
}

impl hyper::rt::Sleep for Lent {}

impl Future for Lent {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.get_mut().inner {
            Some(inner) => inner.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        // Given back registered: the next head's deadline is later, so moving it there
        // updates the entry in place.
        if let Some(inner) = self.inner.take() {
            let mut spare = lock(&self.spare);
            if spare.is_none() {
                *spare = Some(inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer as _;

    /// The timer fires at its deadline, and the runtime timer goes back to the connection
    /// when hyper drops it: the next sleep is the same allocation, moved to its deadline.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_sleep_gives_its_timer_back_and_the_next_one_fires_on_time() {
        let timer = ConnectionTimer::default();
        let start = tokio::time::Instant::now();
        let first = timer.sleep(Duration::from_secs(30));
        let first_ptr = spare_ptr_after_drop(&timer, first);
        let second = timer.sleep(Duration::from_secs(5));
        assert!(lock(&timer.spare).is_none(), "the spare is lent out");
        second.await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        let third = timer.sleep_until(timer.now() + Duration::from_secs(2));
        let third_ptr = spare_ptr_after_drop(&timer, third);
        assert_eq!(first_ptr, third_ptr, "one runtime timer for the connection");
        timer.clear();
        assert!(
            lock(&timer.spare).is_none(),
            "a parked connection keeps no timer"
        );
    }

    /// A sleep moved to an earlier deadline fires then, and one moved later waits.
    #[tokio::test(start_paused = true)]
    async fn reset_moves_the_deadline_both_ways() {
        let timer = ConnectionTimer::default();
        let start = tokio::time::Instant::now();
        let mut sleep = timer.sleep(Duration::from_secs(30));
        timer.reset(&mut sleep, timer.now() + Duration::from_secs(3));
        sleep.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        timer.reset(&mut sleep, timer.now() + Duration::from_secs(7));
        let waited = tokio::time::timeout(Duration::from_secs(6), sleep.as_mut()).await;
        assert!(waited.is_err(), "moved later, it did not fire early");
        sleep.await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    /// Two sleeps out at once each keep their own deadline.
    #[tokio::test(start_paused = true)]
    async fn a_second_sleep_while_one_is_out_has_its_own_timer() {
        let timer = ConnectionTimer::default();
        let start = tokio::time::Instant::now();
        let long = timer.sleep(Duration::from_secs(20));
        let short = timer.sleep(Duration::from_secs(4));
        short.await;
        assert_eq!(start.elapsed(), Duration::from_secs(4));
        long.await;
        assert_eq!(start.elapsed(), Duration::from_secs(20));
    }

    fn spare_ptr_after_drop(
        timer: &ConnectionTimer,
        sleep: Pin<Box<dyn hyper::rt::Sleep>>,
    ) -> *const Sleep {
        drop(sleep);
        let spare = lock(&timer.spare);
        let inner = spare.as_ref().expect("given back");
        std::ptr::from_ref::<Sleep>(&**inner)
    }
}
