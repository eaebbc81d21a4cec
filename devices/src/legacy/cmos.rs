//! A minimal MC146818 CMOS/RTC at ports 0x70 (index) / 0x71 (data): the wall-clock time in BCD,
//! 24-hour mode, update-in-progress always clear and the "valid" bit set.
//!
//! Without it, Linux's RTC read finds 0xff (UIP set) and spins ~10 000 port exits waiting for an
//! update to finish — expensive on any KVM and very slow on a software one.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Index port.
pub const CMOS_PORT_BASE: u64 = 0x70;
/// Ports 0x70 and 0x71.
pub const CMOS_PORT_LEN: u64 = 2;

/// The CMOS device. Non-time registers are plain NVRAM (128 bytes).
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: fn() -> u64,
}

fn system_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The last two decimal digits of `v` in BCD.
fn bcd(v: u64) -> u8 {
    let two_digits = u8::try_from(v % 100).unwrap_or(0);
    (two_digits / 10) << 4 | (two_digits % 10)
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm): year, month (1-12),
/// day (1-31).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Day 1-31 and month 1-12 by construction (`doy` 0-365, `mp` 0-11).
    let d = u64::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u64::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(system_now)
    }
}

impl Cmos {
    /// A CMOS reading the time from `now` (seconds since the epoch).
    pub fn with_clock(now: fn() -> u64) -> Self {
        Cmos {
            index: 0,
            nvram: [0; 128],
            now,
        }
    }

    fn register(&self, reg: u8) -> u8 {
        let t = (self.now)();
        let days = i64::try_from(t / 86_400).unwrap_or(i64::MAX / 2);
        let secs = t % 86_400;
        let (y, m, d) = civil(days);
        match reg {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd((days + 4).rem_euclid(7).unsigned_abs() + 1),
            0x07 => bcd(d),
            0x08 => bcd(m),
            0x09 => bcd(y.rem_euclid(100).unsigned_abs()),
            0x32 => bcd((y / 100).unsigned_abs()),
            0x0a => 0x26, // divider 32.768 kHz, rate 1024 Hz, UIP clear
            0x0b => 0x02, // 24-hour, BCD, no interrupts
            0x0c => 0x00,
            0x0d => 0x80, // valid RAM and time
            r => self.nvram[usize::from(r & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match (offset, data.len()) {
            (0, 1) => self.index,
            (1, 1) => self.register(self.index),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            // Bit 7 of the index port is the NMI mask: ignore it.
            0 => self.index = data[0] & 0x7f,
            // Time and status registers are read-only here; the rest is NVRAM.
            1 if !matches!(self.index, 0x00..=0x0d | 0x32) => {
                self.nvram[usize::from(self.index)] = data[0];
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg | 0x80]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn time_in_bcd() {
        // 2026-11-23 12:34:56 UTC (a Monday).
        let mut c = Cmos::with_clock(|| 1_795_437_296);
        assert_eq!(read(&mut c, 0x00), 0x56);
        assert_eq!(read(&mut c, 0x02), 0x34);
        assert_eq!(read(&mut c, 0x04), 0x12);
        assert_eq!(read(&mut c, 0x07), 0x23);
        assert_eq!(read(&mut c, 0x08), 0x11);
        assert_eq!(read(&mut c, 0x09), 0x26);
        assert_eq!(read(&mut c, 0x32), 0x20);
        assert_eq!(read(&mut c, 0x06), 0x02, "Monday is day 2");
        assert_eq!(read(&mut c, 0x0a) & 0x80, 0, "update never in progress");
        assert_eq!(read(&mut c, 0x0d), 0x80);
    }

    #[test]
    fn nvram_and_bad_accesses() {
        let mut c = Cmos::default();
        c.write(0, &[0x40]);
        c.write(1, &[0x99]);
        assert_eq!(read(&mut c, 0x40), 0x99);
        c.write(0, &[0x00]);
        c.write(1, &[0x11]); // time registers are read-only here
        assert_ne!(read(&mut c, 0x0b), 0x11);
        let mut w = [0u8; 2];
        c.read(1, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        c.write(5, &[1]);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_780), (2026, 11, 23));
    }
}
