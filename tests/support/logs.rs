//! Every log line a test's code writes at TRACE, and the check that none
//! holds key material. Included by the tests that handle private keys.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use weft::identity::contains_key_material;

/// Every log line written while it is the default subscriber.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Every target at TRACE into a new buffer, on this thread (the tests
    /// run on a current-thread runtime, so every task they spawn too) while
    /// the guard lives.
    pub fn at_trace() -> (Self, tracing::subscriber::DefaultGuard) {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

/// Fails naming the line that holds one of `keys`.
pub fn assert_no_key(what: &str, log: &str, keys: &[String]) {
    assert!(!keys.is_empty(), "{what}: no key was handled");
    assert!(!log.is_empty(), "{what}: nothing was logged at trace");
    for line in log.lines() {
        for key in keys {
            assert!(
                !contains_key_material(line, key),
                "{what} logged key material: {line}"
            );
        }
    }
}
