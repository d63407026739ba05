//! The API socket's HTTP/1.1 request reader (head parser, Content-Length, 100-continue)
//! on arbitrary bytes from an allowed local client. See nvmux_daemon::http.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nvmux_daemon::http::fuzz_request(data);
});
