//! Address plumbing between kernel context words and the shared 16-byte form.

/// Four network-order words as the kernel exposes them (`user_ip6`, `src_ip6`...) to bytes.
#[inline(always)]
pub fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let a = w[0].to_ne_bytes();
    let b = w[1].to_ne_bytes();
    let c = w[2].to_ne_bytes();
    let d = w[3].to_ne_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The inverse of [`words_to_bytes`].
#[inline(always)]
pub fn bytes_to_words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The IPv4 part of a mapped address as the kernel's network-order `user_ip4` word.
#[inline(always)]
pub fn mapped_tail(b: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([b[12], b[13], b[14], b[15]])
}

#[inline(always)]
pub fn is_zero16(b: &[u8; 16]) -> bool {
    let w = bytes_to_words(b);
    (w[0] | w[1] | w[2] | w[3]) == 0
}

#[inline(always)]
pub fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let x = bytes_to_words(a);
    let y = bytes_to_words(b);
    ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0
}
