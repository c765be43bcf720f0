//! The legacy PC devices this VMM emulates, each a [`vcpu_runner::BusDevice`] on the port I/O
//! bus: a 16550 UART ([`serial`]), the i8042's reset line ([`i8042`]), a CMOS RTC ([`rtc`]),
//! the ACPI sleep, reset and shutdown-notice registers ([`power`]) and a pvpanic port
//! ([`pvpanic`]). [`GuestEnd`] carries a guest's request to power off or reset, its panic
//! report and its notice of an orderly shutdown from the device that saw it to the thread that
//! ends the VMM.

pub mod i8042;
pub mod power;
pub mod pvpanic;
pub mod rtc;
pub mod serial;

use std::sync::Mutex;
use std::time::Instant;

/// What the guest asked for through a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// A reset: the i8042 command 0xfe, or the ACPI reset register.
    Reset,
    /// A panic report through the pvpanic port.
    Panic,
}

/// The first power-off or reset request of a guest; later ones are ignored, since the guest
/// keeps running until the VMM stops it and its fallbacks (another reset method, a triple
/// fault) must not replace the request that came first.
#[derive(Debug, Default)]
pub struct GuestEnd {
    first: Mutex<Option<GuestRequest>>,
    shutdown_notice: Mutex<Option<Instant>>,
}

impl GuestEnd {
    /// No request yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `request` unless one is recorded already.
    pub fn request(&self, request: GuestRequest) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            log::debug!("guest requested {request:?}");
            *first = Some(request);
        }
    }

    /// The first request, if any.
    pub fn get(&self) -> Option<GuestRequest> {
        *self.first.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the guest began an orderly restart, halt or power-off (ACPI `\_TTS`);
    /// the first notice's time is kept.
    pub fn notice_shutdown(&self) {
        let mut notice = self
            .shutdown_notice
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if notice.is_none() {
            log::debug!("guest began an orderly shutdown");
            *notice = Some(Instant::now());
        }
    }

    /// When the guest began an orderly shutdown, if it did.
    pub fn shutdown_noticed(&self) -> Option<Instant> {
        *self
            .shutdown_notice
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let end = GuestEnd::new();
        assert_eq!(end.get(), None);
        end.request(GuestRequest::Reset);
        end.request(GuestRequest::PowerOff);
        assert_eq!(end.get(), Some(GuestRequest::Reset));
    }

    #[test]
    fn first_shutdown_notice_is_kept() {
        let end = GuestEnd::new();
        assert_eq!(end.shutdown_noticed(), None);
        end.notice_shutdown();
        let first = end.shutdown_noticed().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        end.notice_shutdown();
        assert_eq!(end.shutdown_noticed(), Some(first));
    }
}
