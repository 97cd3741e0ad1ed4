#!/bin/busybox sh
# /init of the fixedram Linux test guest (fixedram.guest.linux): mount what the workload
# needs and run it with the serial console as its output.
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t tmpfs -o size=95% data /data
exec /lxguest </dev/null >/dev/ttyS0 2>&1
