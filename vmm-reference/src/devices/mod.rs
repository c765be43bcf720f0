//! The legacy PC devices this VMM emulates, each a [`vcpu_runner::BusDevice`] on the port I/O
//! bus: a 16550 UART ([`serial`]), the i8042's reset line ([`i8042`]), a CMOS RTC ([`rtc`])
//! and the ACPI sleep registers ([`power`]). [`GuestEnd`] carries a guest's request to power
//! off or reset from the device that saw it to the thread that ends the VMM.

pub mod i8042;
pub mod power;
pub mod rtc;
pub mod serial;

use std::sync::Mutex;

/// What the guest asked for through a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// A reset through the i8042 (command 0xfe).
    Reset,
}

/// The first power-off or reset request of a guest; later ones are ignored, since the guest
/// keeps running until the VMM stops it and its fallbacks (another reset method, a triple
/// fault) must not replace the request that came first.
#[derive(Debug, Default)]
pub struct GuestEnd {
    first: Mutex<Option<GuestRequest>>,
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
}
