package Test::Nginx::Socket;

# ---------------------------------------------------------------------------
# pdgate's compatible subset of OpenResty's Test::Nginx::Socket (0.33).
#
# Written from the documented block format (the module's POD); it shares no
# code with the original.  .t files written for the real Test::Nginx::Socket
# run unchanged with this one, and the other way round, with the same
# subtests.  The engine lives in Test::Nginx::Util; this package only makes
# the test script a Test::Base user (the "=== TEST" / "--- section" parser,
# its filters such as eval/chomp, plan(), blocks(), is(), like(), ...) and
# exports the scaffold's functions.  See the POD below for what is covered.
# ---------------------------------------------------------------------------

use Test::Base -Base;
use Test::Nginx::Util;

our $VERSION = '0.33';

our @EXPORT = qw(
    env_to_nginx is_str plan run_tests run_test repeat_each config_preamble
    worker_connections master_process_enabled no_long_string workers
    master_on master_off log_level no_shuffle no_root_location use_hup
    server_name server_addr server_root html_dir server_port
    server_port_for_client timeout no_nginx_manager check_accum_error_log
    add_block_preprocessor bail_out add_test_cleanup_handler
    add_cleanup_handler add_response_body_check
);

1;
__END__

=encoding utf-8

=head1 NAME

Test::Nginx::Socket - compatible subset of OpenResty's Test::Nginx::Socket 0.33

=head1 SYNOPSIS

    use Test::Nginx::Socket 'no_plan';
    # or: use Test::Nginx::Socket;
    #     repeat_each(2);
    #     plan tests => repeat_each() * (blocks() * 2);

    run_tests();

    __DATA__

    === TEST 1: hello
    --- config
        location = /t {
            return 200 "hello\n";
        }
    --- request
    GET /t
    --- response_body
    hello
    --- no_error_log
    [error]

Run with C<prove -I tests/lib tests/>.

=head1 DESCRIPTION

An independent implementation of the data-driven nginx test format of
OpenResty's Test::Nginx::Socket, written from its documentation, for
Debian's Perl packages only (Test::Base, Test::LongString, HTTP::Message).
A F<.t> file passes or fails the same way with this module and with the
original, and produces the same number of subtests with the same names, so
C<plan tests =E<gt> ...> formulas stay valid.

For each block (in random order unless C<no_shuffle()>), the scaffold
writes F<servroot/conf/nginx.conf>, restarts nginx (or reloads it with HUP
under C<TEST_NGINX_USE_HUP=1>), sends the request(s) C<repeat_each()> times
and checks the responses and the part of F<error.log> written meanwhile.
nginx is stopped at the end of the file.

=head1 FUNCTIONS

Exported: C<run_tests>, C<repeat_each>, C<workers>, C<worker_connections>,
C<master_on>, C<master_off>, C<master_process_enabled>, C<log_level>,
C<no_shuffle>, C<no_root_location>, C<no_long_string>, C<use_hup>,
C<env_to_nginx>, C<config_preamble>, C<server_name>, C<server_addr>,
C<server_root>, C<html_dir>, C<server_port>, C<server_port_for_client>,
C<timeout>, C<no_nginx_manager>, C<check_accum_error_log>,
C<add_block_preprocessor>, C<add_response_body_check>, C<add_cleanup_handler>,
C<add_test_cleanup_handler>, C<bail_out>, C<is_str>, C<run_test>, plus
Test::Base's own exports (C<plan>, C<blocks>, C<is>, C<like>, C<unlike>,
C<is_deeply>, C<ok>, C<pass>, C<fail>, C<diag>, C<no_diff>, ...).
C<$Test::Nginx::Util::ServerPort> and friends are available fully
qualified, as upstream.

=head1 SECTIONS

=over

=item Server set-up

C<config>, C<http_config>, C<main_config>, C<post_main_config>,
C<server_name>, C<log_level>, C<error_log_file>, C<user_files> (text with
C<E<gt>E<gt>E<gt> name [mtime]> headers, or an eval'ed array),
C<post_setup_server_root>, C<init>, C<must_die> (optionally with the exit
code; the nginx stderr is checked together with F<error.log>),
C<suppress_stderr>, C<reload_fails> (HUP mode).
C<$TEST_NGINX_*> variables are expanded in the config sections, in
C<user_files>, C<pipelined_requests>, C<response_body> and
C<grep_error_log_out>; C<$TEST_NGINX_RAND_PORT_N> gives distinct free ports
per block.

=item Requests

C<request> (C<METHOD [URI [VERSION]]> then an optional body, sent with
Content-Length; C<eval> may give an array of requests, each possibly an
array of packets, strings or C<{ value =E<gt> ..., delay_before =E<gt> ... }>),
C<more_headers> (or an array, one per request), C<raw_request> (string or
array of packets), C<raw_request_middle_delay>, C<pipelined_requests>,
C<timeout> (per I/O, C<1.5>, C<1.5s> or C<200ms>), C<abort>, C<shutdown>,
C<server_addr_for_client>, C<curl> (prints a curl command line),
C<request_eval> (deprecated form).

=item Response checks

C<error_code>, C<error_code_like>, C<response_headers> (C<Name: value>,
C<!Name> for "absent"), C<response_headers_like>,
C<raw_response_headers_like>, C<raw_response_headers_unlike>,
C<response_body> (compared after de-chunking; a C<qr//> from C<eval> is
matched), C<response_body_like>, C<response_body_unlike>,
C<response_body_filters>, C<response_body_json_sort>, C<charset>,
C<response_body_eval> (deprecated form), C<ignore_response>, C<http09>,
C<write_resp_body_file>.  With several requests every expectation must be
an array with one entry per request.

=item Log checks

C<error_log>, C<no_error_log> (substrings per line, or C<eval> giving a
C<qr//> or an array of both), C<grep_error_log> + C<grep_error_log_out>,
C<access_log>, C<no_access_log>, C<shutdown_error_log>,
C<no_shutdown_error_log>, C<wait>.  Logs are checked after each response
against the lines written since the previous check.

=item Meta

C<ONLY>, C<SKIP>, C<LAST> (from Test::Base), C<skip_eval>, C<skip_nginx>,
C<skip_nginx2>, C<skip_openssl>, C<todo>; C<no_check_leak> is accepted and
ignored.

=back

Blocks using C<http2>, C<http3>, C<tcp_*>, C<udp_*>, C<stap*>,
C<skip_slave> or C<todo_nginx> are refused with a bail out.

=head1 ENVIRONMENT

C<TEST_NGINX_BINARY> (default C<nginx> in C<PATH>), C<TEST_NGINX_LOAD_MODULES>
(space separated F<.so> paths, emitted as C<load_module> lines),
C<TEST_NGINX_SERVROOT> (default F<t/servroot> under the current
directory), C<TEST_NGINX_PORT>, C<TEST_NGINX_SERVER_PORT>,
C<TEST_NGINX_CLIENT_PORT> (default 1984), C<TEST_NGINX_RANDOMIZE> (random
port and F<t/servroot_PORT>, for C<prove -j>), C<TEST_NGINX_NO_CLEAN>,
C<TEST_NGINX_MASTER_PROCESS>, C<TEST_NGINX_USE_HUP>, C<TEST_NGINX_LOG_LEVEL>,
C<TEST_NGINX_TIMEOUT>, C<TEST_NGINX_SLEEP>, C<TEST_NGINX_NO_SHUFFLE>,
C<TEST_NGINX_FORCE_RESTART_ON_TEST>, C<TEST_NGINX_NO_NGINX_MANAGER>,
C<TEST_NGINX_POSTPONE_OUTPUT>, C<TEST_NGINX_EVENT_TYPE>,
C<TEST_NGINX_LD_PRELOAD>, C<TEST_NGINX_ERROR_LOG>,
C<TEST_NGINX_IGNORE_MISSING_DIRECTIVES>, C<TEST_NGINX_WORKER_USER>,
C<TEST_NGINX_FAST_SHUTDOWN>, C<TEST_NGINX_CHECK_ACCUM_ERR_LOG>,
C<TEST_NGINX_VERBOSE>.

=head1 DIFFERENCES FROM THE ORIGINAL

=over

=item *

The server listens on C<127.0.0.1:PORT> only (the original: all interfaces).

=item *

When nginx cannot be started for a block (other than C<must_die>), the
block's subtests fail at once with nginx's stderr shown, and the run goes
on; the original retries for 30 seconds and then bails out.

=item *

A C<no_error_log> (or C<no_access_log>) pattern that matches several lines
fails once, not once per line, so the subtest count never changes.

=item *

A process that has exited but not been reaped (a zombie, as daemonized
nginx becomes where PID 1 does not reap) counts as stopped, so stopping
nginx does not wait for the time-out.

=item *

C<$TEST_NGINX_HTML_DIR>, C<$TEST_NGINX_SERVROOT> and
C<$TEST_NGINX_SERVER_ROOT> expand to the scaffold's paths when not set in
the environment (the original requires the first two to be set by hand).

=item *

Chunk extensions (C<1;ext=1>) and undeclared trailers are accepted when
de-chunking; a C<HEAD> response is taken to have no body.

=item *

Valgrind, systemtap, leak checking, benchmarking, HTTP/2 and HTTP/3 modes
are not implemented (their environment variables are reported and ignored).

=back

=cut
