"""Operations: the control socket and `scale0 ctl`, metrics, the status page, access log."""
