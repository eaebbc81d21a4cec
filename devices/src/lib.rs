//! kestrel-devices
