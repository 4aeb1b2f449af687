# Every sample in nginx-conf/ passes nginx -t against this checkout's dist/
# (with @DIST@ replaced, under a scratch prefix). Samples for balancers not
# built yet fail here, naming the missing module, until they land.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::GlobalProxy qw(slurp spit dist);
use File::Basename qw(basename);
use File::Temp qw(tempdir);
use Test::More;

my $DIST = dist();
my @samples = sort glob("$FindBin::Bin/../nginx-conf/*.conf");
ok(@samples >= 9, scalar(@samples) . ' samples');

for my $sample (@samples) {
    my $name = basename($sample);
    my $tmp = tempdir(CLEANUP => 1);
    chmod 0755, $tmp;
    mkdir "$tmp/logs"; mkdir "$tmp/conf";
    (my $text = slurp($sample)) =~ s/\@DIST\@/$DIST/g;
    spit("$tmp/conf/$name", $text);
    my $out = `$DIST/sbin/nginx -t -q -p $tmp/ -c $tmp/conf/$name 2>&1`;
    is($?, 0, "nginx -t $name") or diag($out);
    unlike($text, qr/;;/, "$name has no stray ;;");
}

done_testing();
