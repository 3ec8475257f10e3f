//! A server on a thread of its own, with its own single-threaded tokio runtime, so that no
//! request it answers can delay the control thread (the admin API, the health servers).
//!
//! Owns: starting the thread, stopping what it serves and joining it when dropped (tasks the
//! server spawned are dropped with its runtime, so their listeners close).
//! Must not know: what is served.

use std::future::Future;

use tokio::sync::oneshot;

/// The running thread. Dropping it stops the server and joins the thread.
#[derive(Debug)]
pub struct ServerThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `serve()` on `runtime` in a new thread named `name` until it ends or the
    /// returned value is dropped. Streams still being written then are abandoned, not
    /// waited for.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn spawn<F, Fut>(
        name: &str,
        runtime: tokio::runtime::Runtime,
        serve: F,
    ) -> std::io::Result<Self>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        () = serve() => {}
                        _ = stopped => {}
                    }
                });
                runtime.shutdown_background();
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
