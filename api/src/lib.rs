//! kestrel-api
