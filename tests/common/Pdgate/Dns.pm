# Pdgate::Dns — a small DNS server for the tests of `server NAME resolve`
# (nginx's upstream re-resolution): answers A and SRV questions from a
# zone file the test rewrites while nginx runs, with a TTL of 1 s.
#
#   my ($port, $pid) = Pdgate::Dns::start($zone_file);
#   spit($zone_file, "A pool.test 127.0.0.1\nSRV _http._tcp.p.test 10 0 8000 e1.test\n");
#
# Zone lines: `A name address` and `SRV name priority weight port target`.
# A name with no record of the type asked gets an empty answer (NOERROR);
# an unknown name NXDOMAIN. The server is a forked child: stop() it.
package Pdgate::Dns;

use strict;
use warnings;
use IO::Socket::INET;

sub _zone {
    my ($file) = @_;
    my (%a, %srv);
    open my $fh, '<', $file or return ({}, {});
    while (<$fh>) {
        my @f = split;
        next unless @f;
        if ($f[0] eq 'A' && @f == 3) {
            push @{ $a{ lc $f[1] } }, $f[2];
        } elsif ($f[0] eq 'SRV' && @f == 6) {
            push @{ $srv{ lc $f[1] } }, [ @f[2 .. 5] ];
        }
    }
    close $fh;
    return (\%a, \%srv);
}

sub _name {
    my ($name) = @_;
    return join('', map { chr(length $_) . $_ } split /\./, $name) . "\0";
}

sub _answer {
    my ($q, $file) = @_;
    return undef if length $q < 17;
    my ($id) = unpack 'n', $q;
    my $i = 12;
    my @labels;
    while ($i < length $q) {
        my $len = ord substr $q, $i, 1;
        last if $len == 0;
        push @labels, lc substr $q, $i + 1, $len;
        $i += 1 + $len;
    }
    my $question = substr $q, 12, $i + 5 - 12;
    my ($qtype) = unpack 'n', substr $q, $i + 1, 2;
    my $name = join '.', @labels;
    my ($a, $srv) = _zone($file);
    my @rr;
    if ($qtype == 1) {
        @rr = map { pack('nnnNn', 0xC00C, 1, 1, 1, 4) . pack('C4', split /\./) } @{ $a->{$name} // [] };
    } elsif ($qtype == 33) {
        for (@{ $srv->{$name} // [] }) {
            my ($prio, $weight, $port, $target) = @$_;
            my $rdata = pack('nnn', $prio, $weight, $port) . _name($target);
            push @rr, pack('nnnNn', 0xC00C, 33, 1, 1, length $rdata) . $rdata;
        }
    }
    my $known = exists $a->{$name} || exists $srv->{$name};
    my $flags = 0x8180 | ($known ? 0 : 3);
    return pack('nnnnnn', $id, $flags, 1, scalar @rr, 0, 0) . $question . join('', @rr);
}

# start($zone_file) -> ($port, $pid): a DNS server on 127.0.0.1 (UDP).
sub start {
    my ($file) = @_;
    my $sock = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'udp')
        or die "dns socket: $!";
    my $port = $sock->sockport;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        while (1) {
            my $peer = $sock->recv(my $q, 512) // next;
            my $reply = _answer($q, $file) // next;
            $sock->send($reply, 0, $peer);
        }
    }
    close $sock;
    return ($port, $pid);
}

sub stop {
    my ($pid) = @_;
    return unless $pid;
    local $?;   # waitpid's status must not become the test's exit status
    kill 'TERM', $pid;
    waitpid $pid, 0;
}

1;
