//! The server-wide stop signal: listeners stop accepting, connections stop
//! reading new requests and finish the ones in flight.

use tokio::sync::watch;

pub(crate) struct ShutdownTrigger(watch::Sender<bool>);

impl ShutdownTrigger {
    pub fn new() -> Self {
        Self(watch::channel(false).0)
    }

    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.0.subscribe())
    }
}

#[derive(Clone)]
pub(crate) struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// Resolves once shutdown was triggered. Cancel-safe, and resolves at
    /// once on every later call.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|stop| *stop).await.is_err() {
            // The trigger is gone, so no shutdown can ever come.
            std::future::pending::<()>().await;
        }
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}
