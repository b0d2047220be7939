#!/bin/busybox sh
# /init of a Wrenn VM capsule's initramfs (see image.rs): load the modules,
# configure eth0 from the kernel command line, mount the root disk, put envd
# on a read-only tmpfs at /.wrenn and make it PID 1. On any failure: say so
# on the console and power off, so the agent sees the VMM exit.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
  echo "wrenn-init: $*" >/dev/console
  poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r m; do
  insmod "/modules/$m" || fail "cannot load $m"
done </modules/order

ip= gw= dns= host=capsule user= cmd= id= template=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    wrenn.ip=*) ip=${arg#wrenn.ip=} ;;
    wrenn.gw=*) gw=${arg#wrenn.gw=} ;;
    wrenn.dns=*) dns=${arg#wrenn.dns=} ;;
    wrenn.hostname=*) host=${arg#wrenn.hostname=} ;;
    wrenn.user=*) user=$(echo "${arg#wrenn.user=}" | base64 -d) ;;
    wrenn.cmd=*) cmd=$(echo "${arg#wrenn.cmd=}" | base64 -d) ;;
    wrenn.id=*) id=${arg#wrenn.id=} ;;
    wrenn.template=*) template=${arg#wrenn.template=} ;;
  esac
done

ip link set lo up
i=0
while ! ip link set eth0 up 2>/dev/null; do
  i=$((i + 1)); [ $i -lt 200 ] || fail "no eth0"; usleep 10000
done
ip link set eth0 txqueuelen 5000
[ -n "$ip" ] && { ip addr add "$ip" dev eth0 || fail "cannot address eth0"; }
[ -n "$gw" ] && { ip route add default via "$gw" || fail "cannot route via $gw"; }

i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ $i -lt 200 ] || fail "no /dev/vda"; usleep 10000
done
mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount the root disk"

mkdir -p /newroot/.wrenn
mount -t tmpfs -o mode=0755,size=64m tmpfs /newroot/.wrenn || fail "cannot mount /.wrenn"
cp /envd /newroot/.wrenn/envd || fail "cannot copy envd"
mount -o remount,ro /newroot/.wrenn

mkdir -p /newroot/etc
echo "$host" >/newroot/etc/hostname
hostname "$host"
{
  echo "127.0.0.1	localhost"
  echo "::1	localhost ip6-localhost ip6-loopback"
  echo "${ip%/*}	$host"
} >/newroot/etc/hosts
: >/newroot/etc/resolv.conf
for ns in $(echo "$dns" | tr , ' '); do
  echo "nameserver $ns" >>/newroot/etc/resolv.conf
done

for d in dev proc sys; do
  mkdir -p "/newroot/$d"
  mount --move "/$d" "/newroot/$d"
done

export WRENN_SANDBOX_ID="$id" WRENN_TEMPLATE_ID="$template"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
set -- /.wrenn/envd
[ -n "$user" ] && set -- "$@" --default-user "$user"
[ -n "$cmd" ] && set -- "$@" --cmd "$cmd"
exec switch_root /newroot "$@"
