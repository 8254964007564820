//! Hot-path netlink: nf_tables set-element batches through libnftnl/libmnl, and conntrack dumps.
