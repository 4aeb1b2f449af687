package SelfTestEnv;

# Environment defaults for the self-tests of the Test::Nginx subset in
# tests/lib.  Loaded before Test::Nginx::Socket (which reads the environment
# when it is compiled), it works the same for the subset and for the
# original Test::Nginx:
#
#   * TEST_NGINX_BINARY: kept if set, else dist/sbin/nginx of this
#     repository, else "nginx" in PATH; without any, the file is skipped.
#   * TEST_NGINX_SERVROOT: kept if set, else a fresh directory under the
#     system temp dir (removed at exit), so the work tree stays clean.
#   * TEST_NGINX_PORT: kept if a port is set, else a free random port, so
#     that "prove -j" works.
#
# The self-tests need only a stock nginx (core, rewrite, proxy, ssi and
# headers modules); they do not load pdgate's modules.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Spec;
use File::Temp qw(tempdir);
use IO::Socket::INET;

my $repo = abs_path(File::Spec->catdir(dirname(__FILE__), '..', '..'));

sub find_nginx {
    return $ENV{TEST_NGINX_BINARY} if $ENV{TEST_NGINX_BINARY};
    my $dist = File::Spec->catfile($repo, 'dist', 'sbin', 'nginx');
    return $dist if -x $dist;
    for my $dir (split /:/, $ENV{PATH} // '') {
        my $p = File::Spec->catfile($dir, 'nginx');
        return $p if $dir ne '' && -x $p;
    }
    return undef;
}

sub free_port {
    for (1 .. 200) {
        my $port = 20000 + int rand 40000;
        my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
                                      Proto => 'tcp', Listen => 1, Reuse => 1);
        if ($s) { close $s; return $port }
    }
    die "no free port found\n";
}

my $nginx = find_nginx();
if (!$nginx) {
    require Test::More;
    Test::More::plan(skip_all => 'no nginx binary (set TEST_NGINX_BINARY or build dist/sbin/nginx)');
}
$ENV{TEST_NGINX_BINARY} = $nginx;

if (!$ENV{TEST_NGINX_SERVROOT} && !$ENV{TEST_NGINX_RANDOMIZE}) {
    my $keep = $ENV{TEST_NGINX_NO_CLEAN} ? 1 : 0;
    my $tmp = tempdir('pdgate-tn-selftest-XXXXXX', TMPDIR => 1, CLEANUP => !$keep);
    $ENV{TEST_NGINX_SERVROOT} = "$tmp/servroot";
}

if (!$ENV{TEST_NGINX_PORT} && !$ENV{TEST_NGINX_SERVER_PORT} && !$ENV{TEST_NGINX_RANDOMIZE}) {
    $ENV{TEST_NGINX_PORT} = free_port();
}

1;
