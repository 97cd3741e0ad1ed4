#!/bin/busybox sh
# /init of the fixedram Linux test guest (fixedram.testing.guest.linux): mount what the workload
# needs, load the virtio drivers (present devices bind, absent ones are skipped), bring
# the network links up, and run the workload with the serial console as its output.
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t tmpfs -o size=95% data /data
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
         virtio_blk failover net_failover virtio_net virtio_balloon virtio-rng; do
  /bin/busybox insmod /lib/modules/$m.ko >/dev/ttyS0 2>&1
done
for i in /sys/class/net/*; do
  [ -e "$i" ] && /bin/busybox ip link set "${i##*/}" up 2>/dev/null
done
exec /lxguest </dev/null >/dev/ttyS0 2>&1
