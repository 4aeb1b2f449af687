# Every sample in nginx-conf/ passes nginx -t against this checkout's dist/
# (with @DIST@ replaced, under a scratch prefix). Samples for balancers not
# built yet fail here, naming the missing module, until they land. Every
# sample with a P/D location ships the same error handling as
# pdgate-vllm.conf (its maps, the location's tail and @pd_error), which
# 080-pd-error-answers.t runs; and no internal leg location limits the body
# again (a leg's body is a little larger than the client's).
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

# The error-handling lines of a sample, in the order 080 reads them.
sub error_handling {
    my ($text) = @_;
    my @parts = (
        $text =~ /^(    # nginx's own errors on the P\/D location.*?^    limit_req_status 429;\n)/ms,
        $text =~ /^(            # POST only\..*?^            add_header X-Request-Id \$http_x_request_id always;\n)/ms,
        $text =~ /^(        # The JSON error answers of the P\/D location\..*?^        }\n)/ms,
    );
    return @parts == 3 ? join('', @parts) : undef;
}
my $reference = error_handling(slurp("$FindBin::Bin/../nginx-conf/pdgate-vllm.conf"));
ok(defined $reference, 'pdgate-vllm.conf has the error handling');

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
    if ($text =~ /^\s*location ~ .*completions/m) {
        is(error_handling($text), $reference, "$name answers errors as pdgate-vllm.conf does");
    }
    # A leg's body is larger than the client's: no second limit on it.
    for my $internal ($text =~ /^        location \/(?:prefill|encode)_internal\/ \{\n.*?^        \}\n/msg) {
        like($internal, qr/^\s+client_max_body_size 0;/m, "$name: no body limit on an internal leg location");
    }
}

done_testing();
