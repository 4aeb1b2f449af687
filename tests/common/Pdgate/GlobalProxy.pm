# Pdgate::GlobalProxy — helpers for the scripts/global_proxy.sh tests:
# run the script, read and write files, normalize paths for golden files,
# find free ports.
package Pdgate::GlobalProxy;

use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Find ();
use File::Temp qw(tempfile);
use IO::Socket::INET;
use Exporter 'import';

our @EXPORT_OK = qw(run_gp normalize slurp spit tree dist free_port wait_port start_nginx nginx_prefix);

my $root = abs_path(dirname(__FILE__) . '/../../..');
sub dist { "$root/dist" }

# run_gp("flags as a shell string") -> (exit status, stdout, stderr)
sub run_gp {
    my ($flags) = @_;
    my (undef, $out) = tempfile(UNLINK => 1);
    my (undef, $err) = tempfile(UNLINK => 1);
    system("$root/scripts/global_proxy.sh $flags >$out 2>$err");
    return ($? >> 8, slurp($out), slurp($err));
}

# Golden files say @DIST@ for this checkout's dist/ and @TMP@ for the test's
# temporary directory.
sub normalize {
    my ($text, $tmp) = @_;
    my $d = dist();
    $text =~ s/\Q$tmp\E/\@TMP\@/g;
    $text =~ s/\Q$d\E/\@DIST\@/g;
    return $text;
}

sub slurp {
    my ($path) = @_;
    open my $fh, '<', $path or return undef;
    local $/;
    my $s = <$fh>;
    return $s;
}

sub spit {
    my ($path, $text) = @_;
    open my $fh, '>', $path or die "$path: $!";
    print $fh $text;
    close $fh;
}

# Every path under $dir, relative, sorted.
sub tree {
    my ($dir) = @_;
    my @paths;
    File::Find::find({ no_chdir => 1, wanted => sub {
        push @paths, substr($File::Find::name, length($dir) + 1) if $File::Find::name ne $dir;
    } }, $dir);
    return sort @paths;
}

# A port nothing listens on, with port + $also (e.g. a side channel) free
# too; 127.0.0.1.
sub free_port {
    my ($also) = @_;
    for (1 .. 200) {
        my $p = 20000 + int(rand(30000));
        my @need = ($p, defined $also ? $p + $also : ());
        next if grep { !_bindable($_) } @need;
        return $p;
    }
    die "no free port";
}

sub _bindable {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port, Proto => 'tcp', ReuseAddr => 1, Listen => 1);
    return 0 unless $s;
    close $s;
    return 1;
}

# Wait until something accepts on 127.0.0.1:$port (up to $secs).
sub wait_port {
    my ($port, $secs) = @_;
    for (1 .. ($secs // 10) * 20) {
        my $c = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp');
        return 1 if $c;
        select undef, undef, undef, 0.05;
    }
    return 0;
}

# nginx_prefix(): a scratch nginx prefix (with logs/), readable by the
# workers, removed at the end unless PDGATE_KEEP is set (to read its logs).
sub nginx_prefix {
    my $dir = File::Temp::tempdir(CLEANUP => !$ENV{PDGATE_KEEP});
    chmod 0755, $dir;
    mkdir "$dir/logs";
    return $dir;
}

# start_nginx($dir): runs dist/sbin/nginx -p $dir -c nginx.conf and, at
# the end of the test, stops it (only from the process that started it:
# a forked client's exit leaves it running). True when nginx started.
my @started;
sub start_nginx {
    my ($dir) = @_;
    push @started, [$dir, $$];
    return system(dist() . '/sbin/nginx', '-p', $dir, '-c', 'nginx.conf') == 0;
}

END {
    local $?;
    for (@started) {
        my ($dir, $owner) = @$_;
        next if $owner != $$;
        my $pid = slurp("$dir/logs/nginx.pid");
        kill 'QUIT', $1 if defined $pid && $pid =~ /(\d+)/;
    }
}

1;
