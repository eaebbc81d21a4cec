//! kestrel-vmm
