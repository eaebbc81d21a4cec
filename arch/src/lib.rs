//! kestrel-arch
